"""What every command shares: the consoles, the progress bar, the model options and number formats.

Text that came from a user (recipe keys and values, paths, model names) is printed with
``markup=False`` or through `escape`, so square brackets in it are never read as rich markup.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ..core.dtypes import CHOICES as DTYPE_CHOICES
from ..core.io import write_json_atomically
from .checks import data_dir as data_dir_arg

console = Console(stderr=False)
err_console = Console(stderr=True)

DEFAULT_MODEL = "smollm2-135m"
MODEL_HELP = "short name (smollm2-135m, gemma3-270m), hub id, local dir, .gguf, or an lmcompose run directory"
VERIFY_HELP = ("skip the checksums of a run directory or cached model (~0.1 s for SmolLM2); consistency checks "
               "still run")
DTYPE_HELP = "compute dtype; auto = bf16 where it is measurably faster than fp32 (CPUs with AMX, GPUs), else fp32"


def progress() -> Progress:
    """A progress bar on stderr (description, bar, done/total, elapsed time)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err_console, transient=False)


def mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def print_totals(rows: dict) -> None:
    """A two-column table of `rows` (keys and values printed as text, never as markup)."""
    table = Table(show_header=False)
    for k, v in rows.items():
        table.add_row(escape(str(k)), escape(str(v)))
    console.print(table)


def write_json_output(path: str | None, data: dict) -> None:
    """Write `data` to ``--json PATH`` when one was given (atomically)."""
    if path:
        write_json_atomically(Path(path), data)


def model_options(sp: argparse.ArgumentParser, model_help: str = MODEL_HELP, weights_dtype_help: str | None = None,
                  device_choices=("cpu", "cuda", "auto"), default_model: str | None = DEFAULT_MODEL,
                  verify_help: str = VERIFY_HELP) -> None:
    """``--model --dtype --device --data-dir --trust-remote-code --no-verify``.

    Commands that only run forwards load the model in the compute dtype (``--dtype auto|fp32|bf16|fp16``);
    commands whose techniques read the weights give `weights_dtype_help` and take fp32/bf16/fp16. Every
    command that offers ``--no-verify`` passes ``verify=not args.no_verify`` to its loader."""
    if default_model is None:
        sp.add_argument("--model", required=True, help=model_help)
    else:
        sp.add_argument("--model", default=default_model, help=model_help)
    if weights_dtype_help is None:
        sp.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES), help=DTYPE_HELP)
    else:
        sp.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help=weights_dtype_help)
    sp.add_argument("--device", default="cpu", choices=list(device_choices))
    sp.add_argument("--data-dir", type=data_dir_arg, default=None,
                    help="evaluation/calibration data (else $LMCOMPOSE_DATA_DIR, then the data shipped "
                         "with lmcompose, then the hub); an existing directory")
    sp.add_argument("--trust-remote-code", action="store_true")
    sp.add_argument("--no-verify", action="store_true", help=verify_help)


def dumps(value) -> str:
    return json.dumps(value, default=str)
