"""Checks of command-line arguments, run before anything is loaded: a bad argument costs nothing.

* argparse ``type=`` functions for numbers (`count`, `number`): an integer or a finite number within its
  range, else argparse's one-line ``argument --x: ...`` error;
* `output` for ``--out``/``--json``/``--export-dense``: not under an existing file, not an existing target
  without ``--overwrite``, in a directory that can be written;
* `data_file` for an explicit ``--data-dir``: the file a named source needs must be in it (an explicit
  directory is never silently replaced by the hub's copy); with ``resolve``, also a source found without one
  (the library's own `data.text.resolve_file`);
* `existing` for inputs that must exist (run directories, files), `model_exists` for model arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

from ..core.messages import shown, with_hint
from ..techniques.fields import MAX_COUNT, SEED_LIMIT


def count(low: int = 1, high: int = MAX_COUNT):
    """An argparse type: an integer in ``[low, high]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {shown(text)}: not an integer; allowed: an integer in "
                                             f"[{low}, {high:,}]") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"got {value}: allowed: an integer in [{low}, {high:,}]")
        return value

    parse.__name__ = "integer"
    return parse


seed = count(0, SEED_LIMIT - 1)


def number(low: float, high: float, low_open: bool = False):
    """An argparse type: a finite number in ``[low, high]`` (``(low, high]`` with `low_open`)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"got {shown(text)}: not a number; allowed: a number in {interval}") \
                from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"got {shown(text)}: allowed: a number in {interval}")
        return value

    parse.__name__ = "number"
    return parse


def data_dir(text: str) -> str:
    """An argparse type for ``--data-dir``: an existing directory."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a directory" if path.exists()
                                         else f"{shown(text)} does not exist")
    return text


def output(path: str | os.PathLike, flag: str, overwrite: bool | None = False, directory: bool = True) -> Path:
    """Refuse, before any work, an output path that cannot be written: one under an existing file, an existing
    target of the other kind (a file where a directory goes), or an existing target when `overwrite` is False
    (None: an existing directory is fine, e.g. a search resumed in its --out)."""
    path = Path(path).expanduser()
    kind = "directory" if directory else "file"
    if path.exists():
        if path.is_dir() != directory:
            raise FileExistsError(f"{flag} {str(path)!r} exists and is not a {kind}")
        if overwrite is False:
            raise with_hint(FileExistsError(f"{flag} {str(path)!r} exists"), "pass --overwrite to replace it")
    parent = path.parent if not path.exists() else path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a "
                                 "directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is not writable")
    return path


def data_file(data_dir_arg: str | None, source: str, split: str, flag: str = "--data-dir",
              resolve: bool = False) -> None:
    """With an explicit data directory, the file the named source `source`:`split` needs must be in it (a local
    file source must exist). Without one, the library resolves the source (data directory or hub) when it reads
    it; with `resolve` (commands that will read it: eval, fidelity, compress --eval, analyze) that resolution
    runs now, before any model loads (`data.text.resolve_file`: $LMCOMPOSE_DATA_DIR, the data shipped with
    lmcompose, or a hub reachable within seconds), else the error names the file needed and where to put it."""
    from ..data.text import LOCAL_SUFFIXES, NAMED, resolve_file

    if Path(str(source)).suffix in LOCAL_SUFFIXES:
        if not Path(str(source)).expanduser().is_file():
            raise FileNotFoundError(f"calibration file {str(source)!r} does not exist")
        return
    if data_dir_arg is None or (source, split) not in NAMED:
        if resolve:
            resolve_file(source, split, data_dir_arg)
        return
    needed = Path(data_dir_arg).expanduser() / NAMED[(source, split)]
    if not needed.is_file():
        raise with_hint(FileNotFoundError(f"{flag} {data_dir_arg!r} has no {NAMED[(source, split)]} (needed for "
                                          f"{source}:{split}): {str(needed)!r} does not exist"),
                        "put the file there (same layout as ../shared/data), or leave out --data-dir to use "
                        "$LMCOMPOSE_DATA_DIR, the data shipped with lmcompose or the Hugging Face hub")


def existing(path: str, what: str) -> Path:
    """`path`, which must exist."""
    p = Path(path).expanduser()
    if not str(path) or not p.exists():  # Path("") is the current directory
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    return p


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def model_exists(name: str, flag: str = "--model") -> None:
    """A model argument that can name nothing is refused before any work: it must be a short name, an existing
    path (run directory, Hugging Face directory, .gguf file) or look like a hub id (``org/name``, which the
    loader fetches)."""
    from ..models.load import SHORT_NAMES

    if name and (name in SHORT_NAMES or Path(name).expanduser().exists() or _HUB_ID.fullmatch(name)):
        return
    raise FileNotFoundError(f"{flag} {name!r} is not a short name ({', '.join(sorted(SHORT_NAMES))}), an existing "
                            "directory or .gguf file, or a hub id (org/name)")
