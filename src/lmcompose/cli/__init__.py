"""The `lmcompose` command line: the only place that prints or parses arguments (one module per
command group; what they share is in `common`).

    lmcompose compress [--model smollm2-135m] [--recipe R.yaml | --preset NAME] [--out DIR] [--eval quick] [--verbose]
    lmcompose generate RUN_DIR|MODEL --prompt "..." [--max-new-tokens 64] [--no-dense] [--no-chat-template]
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

Every failure ends in `main`'s one error path: one line ``error: ...`` on stderr (and ``hint: ...`` where
one helps), exit code 2 for input the user can fix (an argument, a recipe, a file, a model name) and 1 for a
failure of lmcompose itself (``internal error: ...``), never a traceback unless ``--debug`` is given.
Arguments are checked before anything loads (`checks`). Text that came from a user is never read as rich
markup.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from . import analyze, compress, evaluate, generate, recipe, report, search
from .common import err_console

COMMAND_MODULES = (compress, evaluate, generate, recipe, search, report, analyze)  # each adds its subcommands

# Exit codes: 0 done; 2 the input was refused (an argument, a recipe, a file, a model: the user can fix it);
# 1 lmcompose failed (a bug, or the machine: out of memory); 130 interrupted.
USER_ERROR, INTERNAL_ERROR, INTERRUPTED = 2, 1, 130
# Optional dependencies and the extra that installs them (an ImportError names the extra to install).
EXTRAS = {"optuna": "search", "ray": "search", "lm_eval": "eval", "datasets": "hub", "compressed_tensors": "export"}


class UsageError(Exception):
    """An argument argparse refused (its message names the argument)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a refused argument raises `UsageError` for `main`'s one error path instead of printing the
    usage and exiting (subcommand parsers are of this class too)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lmcompose", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of the library (INFO)")
    p.add_argument("--debug", action="store_true", help="on an error, print its traceback too (anywhere on the line)")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_parser(sub)
    return p


def _one_line(text: str, limit: int = 4000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _validation_message(err) -> str:
    """A pydantic ValidationError on one line: ``where: message (got value)`` per problem."""
    from ..core.messages import shown

    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {shown(e['input'])})" if "input" in e and " got " not in msg else ""
        parts.append(f"{where}: {msg}{got}" if where else f"{msg}{got}")
    return "; ".join(parts)


def classify(err: BaseException) -> tuple[int, str, str, str | None]:
    """``(exit code, label, message, hint)`` for an exception that ended a command."""
    import pydantic
    import yaml

    hint = getattr(err, "hint", None)
    if isinstance(err, UsageError):
        command = str(err).split(":", 1)[0]
        return USER_ERROR, "error", str(err), hint or f"{command} --help lists the arguments"
    if isinstance(err, pydantic.ValidationError):
        return USER_ERROR, "error", _validation_message(err), hint
    if isinstance(err, RecursionError):
        return USER_ERROR, "error", "the input is nested too deeply to read (RecursionError)", hint
    if isinstance(err, ImportError):
        module = (getattr(err, "name", None) or "").split(".")[0]
        extra = EXTRAS.get(module)
        return (USER_ERROR, "error", f"this needs the package {module or '?'}, which is not installed ({err})",
                hint or (f"pip install 'lmcompose[{extra}]'" if extra else None))
    if isinstance(err, (ValueError, OSError, yaml.YAMLError)):
        return USER_ERROR, "error", str(err) or type(err).__name__, hint
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return (INTERNAL_ERROR, "error", f"out of memory ({type(err).__name__}: {err})",
                hint or "try a smaller model, batch size or sequence length")
    detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return INTERNAL_ERROR, "internal error", detail, hint or "run with --debug for the traceback"


def report_error(err: BaseException, debug: bool = False) -> int:
    """Print `err` as one ``error: ...`` line (and a ``hint: ...`` line where there is one) on stderr, the
    traceback first only with `debug`; return the exit code. Nothing of the message is read as markup."""
    from rich.text import Text

    code, label, message, hint = classify(err)
    if debug:
        err_console.print("".join(traceback.format_exception(err)).rstrip(), markup=False, highlight=False,
                          soft_wrap=True)
    err_console.print(Text.assemble((f"{label}:", "bold red"), " ", _one_line(message)), soft_wrap=True,
                      highlight=False)
    if hint:
        err_console.print(Text.assemble(("hint:", "bold"), " ", _one_line(hint)), soft_wrap=True, highlight=False)
    return code


def main(argv=None) -> int:
    """Run one command; every failure ends in `report_error` (one line and an exit code, never a traceback
    unless ``--debug``)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    debug = "--debug" in argv  # taken anywhere on the line, and known even when parsing fails
    try:
        args = build_parser().parse_args([a for a in argv if a != "--debug"])
        args.argv = argv  # the command line as given (a run's model card records it)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return args.func(args)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False, highlight=False)
        return INTERRUPTED
    except SystemExit:  # --help, --version
        raise
    except Exception as err:  # noqa: BLE001 - the one place every failure is reported
        return report_error(err, debug)


if __name__ == "__main__":
    sys.exit(main())
