"""Time per decoder block of each step of finished runs, read from their reports (no compression here).

For every run directory given, one row per step of its recipe: the seconds that step took in all (summed over
the Linears it touched, or once for a model-level step), per block, and the run's peak RSS. `rotate` runs once
per model (its record's ``seconds``); `reconstruct` records its own per-block time; `recover` runs after the
sequential pass (its record's ``seconds``: the optimizer steps and the loss evaluations before and after; the
cached teacher, ``teacher_seconds``, is computed before the sequential pass and shown apart).
The whole block's time (the observe and propagate forwards, the Gram accumulation and every step) is shown
per step row of the sequential pass. Peak RSS is per run, not per step: compare runs that differ by one step to see what a step adds.

    python benchmarks/step_costs.py /tmp/q18/run /tmp/q18b/run           # a markdown table
    python benchmarks/step_costs.py RUN... --json out.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def costs(run: Path) -> list[dict]:
    report = json.loads((run / "report.json").read_text())
    block_seconds = report.get("block_seconds") or []
    blocks = len(block_seconds) or 1
    pass_per_block = sum(block_seconds) / blocks if block_seconds else None  # forwards, Grams and steps
    rss = report.get("peak_rss_bytes")
    steps = [next(iter(s)) for s in report["recipe"]["steps"]]
    per_step: dict[str, float] = defaultdict(float)
    reconstruct_blocks: dict[str, float] = {}
    for layer in report["layers"]:
        for i, step in enumerate(layer.get("steps") or []):
            if step["technique"] == "reconstruct":  # once per block, recorded on each of its Linears
                reconstruct_blocks[layer["name"].rsplit(".", 2)[0]] = step["block_seconds"]
            else:
                per_step[step["technique"]] += step.get("seconds") or 0.0
    for t in report.get("transforms") or []:
        per_step[t["technique"]] += t.get("seconds") or 0.0
    if reconstruct_blocks:
        per_step["reconstruct"] = sum(reconstruct_blocks.values())
    rows = []
    for name in steps:
        total = per_step.get(name)
        model_level = name == "rotate"
        rows.append({"run": str(run), "step": name, "seconds": total,
                     "seconds_per_block": None if total is None or model_level else total / blocks,
                     "pass_seconds_per_block": None if model_level else pass_per_block, "peak_rss_bytes": rss, "blocks": blocks})
    rec = report.get("recovery")
    if rec:
        rows.append({"run": str(run), "step": f"recover ({rec['steps']} steps, {rec.get('loss', 'lm')})",
                     "seconds": rec.get("seconds"), "seconds_per_block": None,
                     "seconds_per_optimizer_step": rec["seconds"] / rec["steps"], "teacher_seconds": rec.get("teacher_seconds"), "peak_rss_bytes": rss,
                     "blocks": blocks})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = [r for run in args.runs for r in costs(run)]
    fmt = lambda v, f="{:.1f}": "" if v is None else f.format(v)  # noqa: E731
    print("| run | step | s in all | s per block | whole block s (passes + steps) | s per optimizer step | teacher s "
          "| run peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['step']} | {fmt(r['seconds'])} | {fmt(r['seconds_per_block'], '{:.2f}')} | "
              f"{fmt(r.get('pass_seconds_per_block'))} | {fmt(r.get('seconds_per_optimizer_step'))} | {fmt(r.get('teacher_seconds'))} | {fmt(r['peak_rss_bytes'] and r['peak_rss_bytes'] / 1e9, '{:.2f}')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
