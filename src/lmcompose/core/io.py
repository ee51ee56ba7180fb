"""Atomic writes: a file or a directory appears whole, or not at all.

Everything lmcompose writes for a user (run directories, reports, caches, search results) goes through
these helpers: the content is written under a hidden temporary name beside the target and renamed over
it in one step, so a crash or a kill leaves either the old target or the new one, never half of one.
Temporary names start with ``.<target name>.tmp-`` so a leftover can be recognised. Files and
directories get the permissions the user's umask gives (``tempfile`` alone would make them private).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed.

    Example::

        with atomic_file("out/front.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomically(path: str | os.PathLike, data, indent: int = 2) -> Path:
    """Write `data` as JSON to `path` atomically (values JSON cannot hold are written as strings)."""
    return write_text_atomically(path, json.dumps(data, indent=indent, default=str))


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool = False, keep_existing: bool = False):
    """Yield a temporary directory that replaces `out_dir` only if the body succeeds.

    `overwrite` replaces an existing `out_dir` (else FileExistsError before any work). With
    `keep_existing`, a concurrent writer that finished first wins: its `out_dir` is kept and ours dropped
    (caches written by several processes at once).
    """
    out = Path(out_dir)
    if out.exists() and not (overwrite or keep_existing):
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass overwrite=True "
                              "(CLI: --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists() and keep_existing:
            return
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first
                if not (keep_existing and out.exists()):
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
