"""The files of a run directory beside the checkpoint: ``report.json`` (what the run did and every
evaluation recorded since) and the checkpoint's metadata, each edited atomically."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.io import write_json_atomically
from .checkpoint import META_FILE, read_metadata

# What the checksums cover, or what decides how the rest is read: never edited after saving.
FIXED_FIELDS = ("format_version", "layers", "model_ops", "checksums")


def update_metadata(out_dir: str | Path, **fields) -> dict:
    """Set top-level `fields` of a saved checkpoint's lmcompose.json (atomically); `FIXED_FIELDS` are refused."""
    fixed = sorted(set(fields) & set(FIXED_FIELDS))
    if fixed:
        raise ValueError(f"fields {fixed} of {META_FILE} are fixed when the checkpoint is saved; editable: any other")
    path = Path(out_dir) / META_FILE
    meta = read_metadata(out_dir)
    meta.update(fields)
    write_json_atomically(path, meta)
    return meta


REPORT_FILE = "report.json"


def record_result(run_dir: str | Path, key: str, value: dict) -> bool:
    """Store an evaluation of a saved run (``zeroshot``, ``fidelity``) under `key` of its report.json, where
    ``lmcompose report`` shows it beside perplexity. Returns False (and writes nothing) when `run_dir` is
    not a run directory of ``lmcompose compress``."""
    path = Path(run_dir) / REPORT_FILE
    if not path.is_file():
        return False
    report = json.loads(path.read_text())
    report[key] = value
    write_json_atomically(path, report)
    return True


# What a run records about its dense base model, under report.json's ``dense``: ``model`` (the base model's name
# as given to compress) and per evaluation (``perplexity``, ``zeroshot``) the same record the run's own has.
DENSE_KEY = "dense"


def record_dense_result(run_dir: str | Path, model: str, key: str, value: dict) -> None:
    """Store an evaluation of run `run_dir`'s dense base model `model` under ``dense.<key>`` of its report.json,
    where ``lmcompose report`` and the model card show it beside the run's own number. Refuses a run
    directory without report.json, or one whose recorded dense model is another."""
    path = Path(run_dir) / REPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory of `lmcompose compress`: {REPORT_FILE} is "
                                "missing")
    report = json.loads(path.read_text())
    dense = report.get(DENSE_KEY) or {}
    if dense.get("model") not in (None, model):
        raise ValueError(f"{str(path)!r} records dense model {dense['model']!r}, not {model!r}; allowed: the same "
                         "dense model for every dense result of a run")
    report[DENSE_KEY] = {**dense, "model": model, key: value}
    write_json_atomically(path, report)
