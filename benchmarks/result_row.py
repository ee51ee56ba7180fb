"""Append one result row (a run's report, plus the evaluations of its saved checkpoint) to a JSONL file.

The rows of `benchmarks/results/quality-issue18-smollm2.jsonl` are built this way: compress with `--eval none`,
evaluate the saved run with the CLI writing JSON, then::

    lmcompose eval --model RUN --protocol quick --dtype bf16 --json RUN/quick_bf16.json
    lmcompose eval --model RUN --protocol full --json RUN/full.json
    lmcompose zeroshot --model RUN --tasks lambada --limit 300 --batch-size 16 --json RUN/lambada.json
    python benchmarks/result_row.py --run RUN --label "gptq w4 g128 -> recover kl" \\
        --out benchmarks/results/quality-issue18-smollm2.jsonl

Every evaluation file present in RUN (quick_bf16.json, full.json, lambada.json, or the paths given) is
stored under its name; the report keeps what the tables read (recipe, calibration, bytes, time, peak RSS,
recovery and transform records, per-block seconds), not the per-Linear records.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEPT = ("recipe", "calibration", "wall_seconds", "peak_rss_bytes", "linear_bytes", "total_bytes", "linear_weights",
        "evaluation", "recovery", "transforms", "environment", "block_seconds")
EVALS = ("quick_bf16", "full", "lambada")


def row(run: Path, label: str, evals: dict[str, Path | None]) -> dict:
    report = json.loads((run / "report.json").read_text())
    out = {"label": label, **{k: report[k] for k in KEPT if report.get(k) not in (None, [], {})}}
    out["bits_per_weight"] = 8 * report["linear_bytes"] / report["linear_weights"]
    for name in EVALS:
        path = evals.get(name) or run / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="an lmcompose run directory (its report.json)")
    ap.add_argument("--label", required=True)
    ap.add_argument("--out", type=Path, required=True, help="the JSONL file the row is appended to")
    for name in EVALS:
        ap.add_argument(f"--{name.replace('_', '-')}", type=Path, default=None,
                        help=f"the JSON of that evaluation (default: RUN/{name}.json if present)")
    args = ap.parse_args()
    made = row(args.run, args.label, {name: getattr(args, name) for name in EVALS})
    with open(args.out, "a") as f:
        f.write(json.dumps(made) + "\n")
    print(json.dumps({k: made[k].get("ppl", made[k].get("tasks")) for k in EVALS if k in made}))


if __name__ == "__main__":
    main()
