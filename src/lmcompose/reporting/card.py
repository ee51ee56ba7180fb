"""The model card of a run directory: ``README.md`` beside the checkpoint, generated from its files.

A run directory is shared (copied, uploaded to a hub) without the command line that made it; the card says
what it is in the form every model hub shows first: the base model, the recipe (as YAML, ready for
``--recipe``), the bytes and bits per weight beside the dense model's, the evaluation protocol and its
results beside the dense reference, the command and the lmcompose version, and the per-Linear results
(folded). It is made from ``report.json`` and ``lmcompose.json`` alone, so it can be rewritten whenever a
result is recorded (`write_card`); it is not covered by the checkpoint's checksums (like report.json, it
changes after saving), and loading never reads it.

Example::

    from lmcompose.reporting.card import write_card
    write_card("runs/smollm2-135m-1a2b3c4d")       # (re)writes runs/.../README.md atomically
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..core.io import write_text_atomically
from ..models.checkpoint import SHARD_INDEX, WEIGHTS_FILE
from ..models.load import HUB_IDS
from .render import dense_rows
from .runs import Run, calibration_label, protocol_label, uncalibrated

CARD_FILE = "README.md"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows] + [""])


def _front_matter(base: str) -> list[str]:
    """YAML front matter a model hub reads: the base model as a hub id where one is known."""
    hub_id = HUB_IDS.get(base, base if base.count("/") == 1 and not Path(base).exists() else None)
    lines = ["---", "library_name: lmcompose", "tags:", "- lmcompose", "- compressed"]
    if hub_id:
        lines.append(f"base_model: {hub_id}")
    return lines + ["---", ""]


def _run(run_dir: str | Path) -> Run:
    """The run's report.json and lmcompose.json; the card needs no byte breakdown, so it reads no weights file
    (a run saved in shards has its card too)."""
    from ..models.checkpoint import META_FILE
    from ..models.rundir import REPORT_FILE

    path = Path(run_dir)
    missing = [f for f in (REPORT_FILE, META_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{str(path)!r} is not an lmcompose run directory: {', '.join(missing)} missing")
    try:
        report, meta = (json.loads((path / f).read_text()) for f in (REPORT_FILE, META_FILE))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r}: a file of the run is not valid JSON ({err})") from None
    return Run(path, path.resolve().name, report, meta)


def model_card(run_dir: str | Path) -> str:
    """The text of the model card of run directory `run_dir` (see the module docstring)."""
    run = _run(run_dir)
    report, meta = run.report, run.meta
    base = run.base_model
    made = meta.get("made_by") or {}
    sharded = (run.path / SHARD_INDEX).is_file() and not (run.path / WEIGHTS_FILE).is_file()  # compress --stream
    weights = f"`{WEIGHTS_FILE}`" if not sharded else f"shards listed in `{SHARD_INDEX}`"
    lines = _front_matter(base)
    lines += [f"# {run.name}", "",
              f"`{base}` compressed with [lmcompose](https://pypi.org/project/lmcompose/) "
              f"{made.get('lmcompose', '')}: **{run.label}**, {run.bits_per_weight:.3f} bits per weight in the "
              f"compressed Linears, {run.total_bytes:,} bytes in all.".replace("  ", " "), "",
              f"The weights are in lmcompose's format ({weights} with packed codes, scales, sparse indices "
              "and factors, described by `lmcompose.json`). Try it with "
              f"`lmcompose generate {run.path} --prompt \"...\"`; `lmcompose export` writes formats other "
              "engines load; `lmcompose report` draws its figures.", ""]
    lines += ["## Size and quality beside the dense model", ""]
    lines += _table(["measure", "this model", f"dense: {base}", "change"], dense_rows(run))
    if run.protocol:
        lines += [f"Perplexity protocol: {protocol_label(run.protocol)}; in full: `{json.dumps(run.protocol)}`.", ""]
    if run.zeroshot:
        lines += ["Zero-shot accuracy (lm-evaluation-harness " + str(run.zeroshot.get("lm_eval_version", "?")) + "):",
                  ""]
        dz = (run.dense.get("zeroshot") or {}).get("tasks", {})
        rows = [[t, f"{m['acc']:.3f}", f"{dz[t]['acc']:.3f}" if t in dz else "—"]
                for t, m in run.zeroshot["tasks"].items()]
        lines += _table(["task", "acc", "dense acc"], rows)
    lines += ["## Recipe", "", "```yaml", yaml.safe_dump(report.get("recipe") or {}, sort_keys=False).rstrip(),
              "```", ""]
    cal = report.get("calibration") or {}
    env = report.get("environment") or {}
    lines += ["## How it was made", "",
              f"* command: `{made.get('command', 'not recorded')}`",
              f"* lmcompose {made.get('lmcompose', '?')}, torch {env.get('torch', '?')}, "
              f"{'cuda (' + env['cuda'] + ')' if env.get('cuda') else 'cpu'}, {env.get('threads', '?')} threads, "
              f"compute dtype {env.get('compute_dtype', '?')}",
              f"* calibration: {calibration_label(cal, long=True)}",
              f"* compression took {report.get('wall_seconds', 0):.1f} s; recipe hash {report.get('recipe_hash', '?')}",
              ""]
    layers = report.get("layers") or []
    rows = []
    for layer in layers:
        if not layer.get("steps"):
            rows.append([layer["name"], f"skipped: {layer.get('skipped')}", "", "", ""])
            continue
        bits = layer.get("bits_per_weight")
        err = layer.get("rel_error")
        rows.append([layer["name"], layer.get("structure", ""), "" if bits is None else f"{bits:.3f}",
                     "" if err is None else f"{err:.3e}", f"{sum(s.get('seconds', 0) for s in layer['steps']):.2f}"])
    if rows:
        lines += [f"<details><summary>Per-Linear results ({len(rows)} Linears)</summary>", ""]
        error = "rel. weight error" if uncalibrated(cal) else "rel. output error"
        lines += _table(["Linear", "structure", "bits/weight", error, "seconds"], rows)
        lines += ["</details>", ""]
    return "\n".join(lines)


def write_card(run_dir: str | Path) -> Path:
    """(Re)write ``README.md`` of run directory `run_dir` atomically; returns its path."""
    return write_text_atomically(Path(run_dir) / CARD_FILE, model_card(run_dir))
