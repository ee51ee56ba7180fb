"""Text sources: named datasets found in a local data directory first, the Hugging Face hub second.

Named sources (file layout of ``../shared/data``):

| name | split | file |
|---|---|---|
| ``wikitext2`` | ``test`` (evaluation) | ``wikitext-2/wiki.test.raw`` |
| ``wikitext2`` | ``validation`` (calibration) | ``wikitext-2/wiki.valid.tokens`` |
| ``c4`` | ``validation`` (calibration) | ``c4/c4_validation_2k.parquet`` (column ``text``) |

The data directory is the `data_dir` argument, else ``$LMCOMPOSE_DATA_DIR``. When the file is absent and
the ``datasets`` package is installed and ``HF_HUB_OFFLINE`` is unset, the hub copy is used
(``wikitext``/``wikitext-2-raw-v1``, ``allenai/c4`` en validation); otherwise the error names the path
that was expected. Any local ``.txt``/``.raw``/``.tokens``/``.jsonl`` (field ``text``)/``.parquet``
(column ``text``) file is a source too.

WikiText-2 follows the evaluation protocol (DESIGN §6): CRLF → LF; each line is one row, a
whitespace-only line is an empty row, other rows keep their trailing newline (as the hub's
``wikitext-2-raw-v1`` rows do); rows are joined with ``"\\n\\n"`` like the GPTQ/SparseGPT evaluation code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NAMED = {
    ("wikitext2", "test"): "wikitext-2/wiki.test.raw",
    ("wikitext2", "validation"): "wikitext-2/wiki.valid.tokens",
    ("c4", "validation"): "c4/c4_validation_2k.parquet",
}
HUB = {
    ("wikitext2", "test"): ("wikitext", "wikitext-2-raw-v1", "test"),
    ("wikitext2", "validation"): ("wikitext", "wikitext-2-raw-v1", "validation"),
    ("c4", "validation"): ("allenai/c4", "en", "validation"),
}
LOCAL_SUFFIXES = (".txt", ".raw", ".tokens", ".jsonl", ".parquet")


def data_dir(explicit: str | Path | None = None) -> Path | None:
    value = explicit or os.environ.get("LMCOMPOSE_DATA_DIR")
    return Path(value) if value else None


def resolve_file(source: str, split: str, explicit_dir: str | Path | None = None) -> Path | None:
    """The local file a source names, or None if it must come from the hub. Raises when neither works."""
    if Path(source).suffix in LOCAL_SUFFIXES:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"text file {source!r} does not exist")
        return path
    if (source, split) not in NAMED:
        allowed = sorted({f"{s}:{sp}" for s, sp in NAMED})
        raise ValueError(f"source={source!r} split={split!r} is not known; allowed: {allowed} or a local "
                         f"{'/'.join(LOCAL_SUFFIXES)} file")
    root = data_dir(explicit_dir)
    if root is not None and (root / NAMED[(source, split)]).is_file():
        return root / NAMED[(source, split)]
    if _hub_available():
        return None
    where = str(root / NAMED[(source, split)]) if root else f"<data dir>/{NAMED[(source, split)]}"
    raise FileNotFoundError(f"{source} ({split}) needs the file {where}; set the data directory with "
                            "--data-dir or LMCOMPOSE_DATA_DIR (layout of ../shared/data), or install `datasets` "
                            "and go online")


def _hub_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("datasets") is not None and not os.environ.get("HF_HUB_OFFLINE")


def _wikitext_rows(text: str) -> list[str]:
    text = text.replace("\r\n", "\n")
    return ["" if not line.strip() else line + "\n" for line in text.split("\n")[:-1 if text.endswith("\n") else None]]


def load_documents(source: str, split: str, data_dir: str | Path | None = None) -> list[str]:
    """Documents (rows) of a source: one per parquet/jsonl record, one per line for text files."""
    path = resolve_file(source, split, data_dir)
    if path is None:
        import datasets

        name, config, hub_split = HUB[(source, split)]
        return list(datasets.load_dataset(name, config, split=hub_split)["text"])
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    return _wikitext_rows(path.read_text(encoding="utf-8"))


def load_text(source: str, split: str, data_dir: str | Path | None = None) -> str:
    """One string: rows joined with blank lines (the WikiText-2 evaluation convention)."""
    return "\n\n".join(load_documents(source, split, data_dir))
