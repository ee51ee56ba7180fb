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


class BlockProgress:
    """Progress of a per-block loop (the ``on_block(done, total)`` callback of `lmcompose.api.compress`): a rich
    bar on stderr when stderr is a terminal, else one plain line per block with that block's seconds and the
    time so far (a log file or a CI job then still shows that the run moves and how fast). Use as a context
    manager; the instance itself is the callback."""

    def __init__(self, description: str):
        self.description = description
        self.live = err_console.is_terminal
        self._prog = progress() if self.live else None
        self._task = None
        self._t0 = self._last = 0.0

    def __enter__(self) -> "BlockProgress":
        import time

        self._t0 = self._last = time.perf_counter()
        if self._prog is not None:
            self._prog.__enter__()
            self._task = self._prog.add_task(escape(self.description), total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self._prog is not None:
            self._prog.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        import time

        now = time.perf_counter()
        if self._prog is not None:
            self._prog.update(self._task, completed=done, total=total)
        else:
            err_console.print(f"{self.description}: block {done}/{total} done in {now - self._last:.1f} s "
                              f"({now - self._t0:.1f} s so far)", markup=False, highlight=False, soft_wrap=True)
        self._last = now


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
    verify_option(sp, verify_help)


def verify_option(sp: argparse.ArgumentParser, help: str = VERIFY_HELP) -> None:
    """``--no-verify``, the one declaration of it (`model_options` and the commands that declare their own model
    arguments); the command passes ``verify=not args.no_verify`` to every loader it calls."""
    sp.add_argument("--no-verify", action="store_true", help=help)


def dumps(value) -> str:
    return json.dumps(value, default=str)
