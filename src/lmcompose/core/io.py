"""Atomic writes: a file or a directory appears whole, or not at all; and what a killed writer left.

Everything lmcompose writes for a user (run directories, reports, caches, search results) goes through
these helpers: the content is written under a hidden temporary name beside the target and renamed over
it in one step, so a crash or a kill leaves either the old target or the new one, never half of one.

Temporary names are ``.<target name>.tmp-<pid>@<host>-<random>`` (and ``.<target name>.old-<pid>@<host>``
for a target being replaced), so a leftover can be recognised and traced to its writer: every write of a
target first removes the temporaries of that target whose writer is gone (`remove_stale_temporaries`): a
process of this host that no longer runs; another host's, or an unnamed writer's, after an hour. Files and
directories get the permissions the user's umask gives (``tempfile`` and safetensors alone would make
them private: 0600/0700).

A cache directory may carry a manifest (`write_manifest`, `check_manifest`): the size, modification time
and sha256 of every file, written inside the temporary directory so that it appears with the files it
describes. Checking it hashes only the files whose time changed by default: hashing the 540 MB of a
dequantized SmolLM2 on every load would add ~0.8 s to a 0.5 s load (BENCHMARKS.md, "Verifying run
directories and the model cache").
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# A temporary whose writer cannot be checked (named before writers were recorded, or by another host) is
# stale after this long; one whose writer is still alive after STALE_ANYWAY_S is taken as a reused pid.
UNKNOWN_WRITER_STALE_S = 3600
STALE_ANYWAY_S = 24 * 3600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _age_s(path: Path) -> float:
    """Seconds since anything in `path` (a file, or a directory and its direct entries) last changed."""
    try:
        newest = path.lstat().st_mtime
        if path.is_dir() and not path.is_symlink():
            for entry in path.iterdir():
                newest = max(newest, entry.lstat().st_mtime)
    except OSError:
        return 0.0
    return time.time() - newest


@functools.cache
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:40]


def _writer() -> str:
    """``<pid>@<host>``: who writes a temporary (the host, because a directory may be shared by machines)."""
    return f"{os.getpid()}@{_host()}"


def _is_stale(path: Path, rest: str, kind: str) -> bool:
    """Whether the temporary `path` (``rest``: its name after `kind`, ``.tmp-`` or ``.old-``) was left by a
    writer that is gone: a process of this host that no longer runs, or any writer, after a long time."""
    m = re.fullmatch(r"(\d+)(?:@([^-]*))?", rest) if kind == ".old-" else re.match(r"(\d+)(?:@([^-]*))?-", rest)
    age = _age_s(path)
    if m is None or (m.group(2) is not None and m.group(2) != _host()):
        return age > UNKNOWN_WRITER_STALE_S  # named before writers were recorded, or another host's
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    return not _alive(pid) or age > STALE_ANYWAY_S


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporaries a killed writer of `target` left beside it (see the module docstring);
    those of a writer still running are kept. Returns what was removed."""
    target = Path(target)
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for kind in (".tmp-", ".old-"):
        prefix = f".{target.name}{kind}"
        for path in entries:
            if not path.name.startswith(prefix) or not _is_stale(path, path.name[len(prefix):], kind):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            if not path.exists():
                log.info("removed %s, left behind by an interrupted write of %s", path, target)
                removed.append(path)
    return removed


def _normal_permissions(root: Path) -> None:
    """Give `root` and everything under it the modes a plain ``open``/``mkdir`` would (0666/0777 less umask)."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed.

    Example::

        with atomic_file("out/front.png") as tmp:
            fig.savefig(tmp, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_writer()}-", suffix=path.suffix, dir=path.parent)
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
    (caches written by several processes at once). Temporaries that a killed earlier writer of `out_dir`
    left are removed first.
    """
    out = Path(out_dir)
    if out.exists() and not (overwrite or keep_existing):
        raise FileExistsError(f"output directory {str(out)!r} already exists; pass overwrite=True "
                              "(CLI: --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_writer()}-", dir=out.parent))
    try:
        yield tmp
        _normal_permissions(tmp)
        if out.exists() and keep_existing and not overwrite:
            return
        if out.exists():
            old = out.with_name(f".{out.name}.old-{_writer()}")
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


# -- manifests ---------------------------------------------------------------------------------------
MANIFEST_FILE = "lmcompose-manifest.json"
CHECKS = ("sizes", "changed", "all")


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tensor_sha256(t) -> str:
    """sha256 of a tensor's dtype, shape and bytes (a reinterpretation of the same bytes differs)."""
    import torch

    h = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode())
    if t.numel():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _entry(p: Path) -> dict:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(p)}


def write_manifest(directory: str | os.PathLike) -> Path:
    """Record the size, modification time and sha256 of every file under `directory` in its
    `MANIFEST_FILE` (atomically)."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): _entry(p) for p in sorted(directory.rglob("*"))
             if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")}
    return write_json_atomically(directory / MANIFEST_FILE, {"algorithm": "sha256", "files": files})


def check_manifest(directory: str | os.PathLike, check: str = "changed", only=None) -> str | None:
    """None when the files the manifest of `directory` lists (those named in `only`, if given) are what it
    recorded; else what is wrong, in words (a missing manifest included).

    `check`: ``"sizes"`` compares sizes only; ``"changed"`` also hashes every file whose modification time
    is not the recorded one (an edit, a truncation, a copy), and records the new time of a file whose hash
    still matches; ``"all"`` hashes every file (also catches damage that kept the time, e.g. of the disk).
    """
    if check not in CHECKS:
        raise ValueError(f"check={check!r} is not allowed; allowed: {list(CHECKS)}")
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not files or not all(isinstance(e, dict) for e in files.values()):
            raise ValueError("no files listed")
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST_FILE} cannot be read ({err})"
    touched = False
    for name, entry in files.items():
        if only is not None and name not in only:
            continue
        p = directory / name
        try:
            st = p.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != entry.get("size"):
            return f"{name} has {st.st_size} bytes, the manifest says {entry.get('size')}"
        if check == "all" or (check == "changed" and st.st_mtime_ns != entry.get("mtime_ns")):
            if file_sha256(p) != entry.get("sha256"):
                return f"{name} does not match its recorded sha256"
            touched |= st.st_mtime_ns != entry.get("mtime_ns")
            entry["mtime_ns"] = st.st_mtime_ns
    if touched:
        try:
            write_json_atomically(directory / MANIFEST_FILE, manifest)
        except OSError:  # a read-only cache is still a good one
            pass
    return None
