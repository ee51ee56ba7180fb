"""Text sources: named datasets found in a local data directory first, the Hugging Face hub second.

Named sources: ``wikitext2`` (``test`` for evaluation only, ``validation`` for calibration) and ``c4``
(``validation``), read from `data_dir` or ``$LMCOMPOSE_DATA_DIR`` (the layout of ``../shared/data``); any
local ``.txt``/``.raw``/``.tokens``/``.jsonl``/``.parquet`` file is a source too. Rows follow the hub's
``wikitext-2-raw-v1`` rows exactly, so the evaluation text is the string GPTQ/SparseGPT evaluate on.

Offline (no network, or ``HF_HUB_OFFLINE``), a source whose file is missing fails in seconds with the path
it needs, instead of retrying the hub (``core/hub.py``).

Method notes: docs/methods/data.md (the file table, the hub fallback, how rows are read)
"""

from __future__ import annotations

import importlib.util
import json
import logging
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


def data_root(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data directory: `explicit`, else ``$LMCOMPOSE_DATA_DIR``, else None."""
    value = explicit if explicit is not None else os.environ.get("LMCOMPOSE_DATA_DIR")
    return Path(value).expanduser() if value else None


def _hub_problem() -> str | None:
    """Why the hub copy of a named source cannot be used now, or None when it can."""
    if importlib.util.find_spec("datasets") is None:
        return "the `datasets` package that reads the hub copy is not installed"
    return hub_unreachable()


def resolve_file(source: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local file a source names, or None when it will come from the hub.

    A named source is looked for in `data_dir` (else ``$LMCOMPOSE_DATA_DIR``). An explicit `data_dir` that
    lacks the file is an error (never a silent download); a data directory from the environment that lacks
    it falls back to the hub, and so does no data directory, when the hub can be reached (probed in
    seconds: ``core/hub.py``).

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
                                "leave --data-dir out to use $LMCOMPOSE_DATA_DIR or the Hugging Face hub")
    problem = _hub_problem()
    if problem is None:
        log.info("%s:%s not found locally; using the Hugging Face hub copy", source, split)
        return None
    where = str(root / relative) if root is not None else f"<data dir>/{relative} (no data directory is set)"
    raise FileNotFoundError(f"{source}:{split} needs the file {where}, and {problem}; put the file there and set the "
                            "data directory with --data-dir or LMCOMPOSE_DATA_DIR (same layout as ../shared/data)")


def read_rows(path: str | os.PathLike) -> list[str]:
    """Rows of a text file exactly as the hub's wikitext rows: see the module docstring."""
    with open(path, encoding="utf-8") as f:  # universal newlines: CRLF (and a lone CR) become LF
        return [row if row.strip() else "" for row in f]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as f:
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
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    return read_rows(path)


def load_text(source: str | os.PathLike, split: str, data_dir: str | os.PathLike | None = None) -> str:
    """One string: the documents joined with ``"\\n\\n"`` (the WikiText-2 evaluation convention)."""
    return "\n\n".join(load_documents(source, split, data_dir))
