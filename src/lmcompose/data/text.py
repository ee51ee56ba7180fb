"""Text sources: named datasets found in a local data directory, in the data shipped with lmcompose, or on
the Hugging Face hub, in that order.

Named sources: ``wikitext2`` (``test`` for evaluation only, ``validation`` for calibration) and ``c4``
(``validation``), read from `data_dir` (``--data-dir``), else ``$LMCOMPOSE_DATA_DIR`` (the layout of
``../shared/data``), else the package data in ``lmcompose/data/packaged/`` (WikiText-2 test and the C4
sample, byte-for-byte the data folder's files, xz-compressed: see its README), else the hub. Any local
``.txt``/``.raw``/``.tokens``/``.jsonl``/``.parquet`` file is a source too. Rows follow the hub's
``wikitext-2-raw-v1`` rows exactly, so the evaluation text is the string GPTQ/SparseGPT evaluate on.

Offline (no network, or ``HF_HUB_OFFLINE``), a source whose file is missing fails in seconds with the path
it needs, instead of retrying the hub (``core/hub.py``).

Method notes: docs/methods/data.md (the file table, the hub fallback, how rows are read)
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import json
import logging
import lzma
import os
from pathlib import Path

from ..core.hub import hub_unreachable

log = logging.getLogger(__name__)

NAMED = {
    ("wikitext2", "test"): "wikitext-2/wiki.test.raw",
    ("wikitext2", "validation"): "wikitext-2/wiki.valid.tokens",
    ("c4", "validation"): "c4/c4_validation_2k.parquet",
}
# (dataset, config, split, data_files) for the hub fallback.
HUB = {
    ("wikitext2", "test"): ("wikitext", "wikitext-2-raw-v1", "test", None),
    ("wikitext2", "validation"): ("wikitext", "wikitext-2-raw-v1", "validation", None),
    ("c4", "validation"): ("allenai/c4", None, "validation",
                           {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
}
LOCAL_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl", ".parquet")
# Named sources shipped inside the package (lmcompose/data/packaged/, package data): the data folder's files
# compressed with xz (wiki.test.raw byte-for-byte; the C4 parquet's `text` column, in order, as JSON lines).
PACKAGED_PACKAGE = "lmcompose.data.packaged"
PACKAGED = {
    ("wikitext2", "test"): "wiki.test.raw.xz",
    ("c4", "validation"): "c4_validation_2k.jsonl.xz",
}
_COMPRESSED = {".xz": lzma.open, ".gz": gzip.open}


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data directory: `explicit`, else ``$LMCOMPOSE_DATA_DIR``, else None."""
    value = explicit if explicit is not None else os.environ.get("LMCOMPOSE_DATA_DIR")
    return Path(value).expanduser() if value else None


def packaged_file(source: str, split: str) -> Path | None:
    """The copy of a named source shipped with lmcompose (found with `importlib.resources`), or None when the
    source is not shipped (or the package data is missing, e.g. a build that left it out)."""
    name = PACKAGED.get((str(source), split))
    if name is None:
        return None
    try:
        resource = importlib.resources.files(PACKAGED_PACKAGE) / name
    except ModuleNotFoundError:
        return None
    # Installed packages are directories on disk (never zip-imported), so the resource is a real path.
    return Path(str(resource)) if isinstance(resource, Path) and resource.is_file() else None


def _hub_problem() -> str | None:
    """Why the hub copy of a named source cannot be used now, or None when it can."""
    if importlib.util.find_spec("datasets") is None:
        return "the `datasets` package that reads the hub copy is not installed"
    return hub_unreachable()


def resolve_file(source: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local file a source names, or None when it will come from the hub.

    A named source is looked for in `data_dir` (else ``$LMCOMPOSE_DATA_DIR``). An explicit `data_dir` that
    lacks the file is an error (never a silent substitute); a data directory from the environment that lacks
    it, or no data directory, falls back to the copy shipped with lmcompose (`packaged_file`: WikiText-2
    test, C4 validation sample), then to the hub when it can be reached (probed in seconds: ``core/hub.py``).

    Raises:
        ValueError: an unknown source name or split.
        FileNotFoundError: a missing local file, or a named source whose file is absent while the hub
            cannot be used; the message gives the expected path and how to set the data directory.
    """
    source = str(source)
    if Path(source).suffix in LOCAL_SUFFIXES:
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file {source!r} does not exist")
        return path
    if (source, split) not in NAMED:
        allowed = sorted(f"{s}:{sp}" for s, sp in NAMED)
        raise ValueError(f"source={source!r} split={split!r} is not known; allowed: {allowed} or a local "
                         f"{'/'.join(LOCAL_SUFFIXES)} file")
    root = data_root(data_dir)
    relative = NAMED[(source, split)]
    if root is not None and (root / relative).is_file():
        return root / relative
    if data_dir is not None:
        raise FileNotFoundError(f"{source}:{split} needs the file {root / relative}, which the data directory given "
                                f"(--data-dir / data_dir) lacks; put it there (same layout as ../shared/data), or "
                                "leave --data-dir out to use $LMCOMPOSE_DATA_DIR, the data shipped with lmcompose "
                                "or the Hugging Face hub")
    shipped = packaged_file(source, split)
    if shipped is not None:
        if root is not None:
            log.info("%s:%s is not in $LMCOMPOSE_DATA_DIR (%s); using the copy shipped with lmcompose", source,
                     split, root)
        return shipped
    problem = _hub_problem()
    if problem is None:
        log.info("%s:%s not found locally; using the Hugging Face hub copy", source, split)
        return None
    where = str(root / relative) if root is not None else f"<data dir>/{relative} (no data directory is set)"
    shipped = ("not shipped with lmcompose" if (source, split) not in PACKAGED
               else "missing from this installation of lmcompose (reinstall it)")
    raise FileNotFoundError(f"{source}:{split} needs the file {where}, its copy is {shipped}, and {problem}; put the "
                            "file there and set the data directory with --data-dir or LMCOMPOSE_DATA_DIR (same "
                            "layout as ../shared/data)")


def _open_text(path: Path):
    """`path` opened for reading text in universal-newline mode (CRLF and a lone CR become LF), decompressing
    ``.xz``/``.gz`` files."""
    opener = _COMPRESSED.get(path.suffix)
    if opener is not None:
        return opener(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _format(path: Path) -> str:
    """The suffix that names a file's format, under a compression suffix (``a.jsonl.xz`` -> ``.jsonl``)."""
    return Path(path.stem).suffix if path.suffix in _COMPRESSED else path.suffix


def read_rows(path: str | os.PathLike) -> list[str]:
    """Rows of a text file exactly as the hub's wikitext rows: see the module docstring."""
    with _open_text(Path(path)) as f:  # universal newlines: CRLF (and a lone CR) become LF
        return [row if row.strip() else "" for row in f]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}: line {number} has no string field 'text'; each line must be "
                                 '{"text": "..."}')
            docs.append(record["text"])
    return docs


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if "text" not in names:
        raise ValueError(f"{path}: parquet has no column 'text'; columns: {names}")
    return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]


def load_documents(source: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None) -> list[str]:
    """Documents of a source: one per parquet/jsonl record (empty ones dropped), one per row for text files.

    Args:
        source: ``"wikitext2"``, ``"c4"`` or a local file path.
        split: the split of a named source (ignored for a local file).
        data_dir: the data directory (default ``$LMCOMPOSE_DATA_DIR``).
    """
    path = resolve_file(source, split, data_dir)
    if path is None:
        import datasets

        name, config, hub_split, files = HUB[(str(source), split)]
        return list(datasets.load_dataset(name, config, data_files=files, split=hub_split)["text"])
    if _format(path) == ".parquet":
        return _read_parquet(path)
    if _format(path) == ".jsonl":
        return _read_jsonl(path)
    return read_rows(path)


def load_text(source: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None) -> str:
    """One string: the documents joined with ``"\\n\\n"`` (the WikiText-2 evaluation convention)."""
    return "\n\n".join(load_documents(source, split, data_dir))
