"""The `lmcompose` command line: the only place that prints or parses arguments (one module per
command group; what they share is in `common`).

    lmcompose compress [--model smollm2-135m] [--recipe R.yaml | --preset NAME] [--out DIR] [--eval quick]
    lmcompose eval --model NAME|PATH|CHECKPOINT --protocol quick
    lmcompose recipe check R.yaml --model NAME
    lmcompose recipe explain R.yaml --model NAME
    lmcompose techniques
    lmcompose zeroshot --model NAME|CHECKPOINT --tasks boolq,rte,piqa,winogrande,openbookqa,lambada --limit 100
    lmcompose fidelity --compressed CHECKPOINT [--dense NAME]
    lmcompose search --model NAME --budget 0.5 | --bits-per-weight 4.2 --trials N --out DIR
    lmcompose report RUN_DIR [RUN_DIR ...] --out DIR
    lmcompose bench-speed --model RUN_DIR [--dense NAME] --prompt-len 256 --new-tokens 64
    lmcompose export RUN_DIR --format dense|compressed-tensors|gguf --out PATH
    lmcompose analyze --a "wanda: {sparsity: 0.5}" --b "gptq: {bits: 4, group_size: 64}" --out DIR
"""

from __future__ import annotations

import argparse
import logging
import sys

from rich.markup import escape

from . import analyze, compress, evaluate, recipe, report, search
from .common import err_console

COMMAND_MODULES = (compress, evaluate, recipe, search, report, analyze)  # each adds its subcommands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmcompose", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of the library (INFO)")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        err_console.print(f"[bold red]error:[/] {escape(str(err))}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
