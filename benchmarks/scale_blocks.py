"""Issue 21's per-block cost at real widths: ``lmcompose compress --stream`` of a checkpoint made by
``make_random_checkpoint.py`` (e.g. 4 blocks of Llama-2-7B's shapes) with each of a few recipes, one after
the other; records per-block seconds (from the run's report.json), total wall time and the child process's
peak RSS (``os.wait4``), including the Hessians / whitening of the 11008-wide down projections.

    python benchmarks/make_random_checkpoint.py --blocks 4 --out /tmp/l7b4
    OMP_NUM_THREADS=2 python benchmarks/scale_blocks.py --model /tmp/l7b4 --out /tmp/scale \\
        --json benchmarks/results/scale-llama2-7b-shapes-4blocks.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from stream_resume import run

CALIBRATION = "calibration: {n: 16, seqlen: 512, batch_size: 4}\n"
ROWS = {
    "gptq w4 g128": "gptq: {bits: 4, group_size: 128}",
    "gptq w4 g128 act-order": "gptq: {bits: 4, group_size: 128, act_order: true, static_groups: true}",
    "sparsegpt 50%": "sparsegpt: {sparsity: 0.5}",
    "svdllm 50% of bytes": "svdllm: {ratio: 0.5}",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="a directory for the recipes and runs")
    p.add_argument("--only", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    blocks = json.loads((Path(args.model) / "config.json").read_text())["num_hidden_layers"]
    results = {"model": args.model, "blocks": blocks, "calibration": CALIBRATION.strip(),
               "threads": os.environ.get("OMP_NUM_THREADS"),
               "date": datetime.date.today().isoformat(), "rows": []}
    for label in args.only:
        slug = label.replace(" ", "-").replace("%", "")
        recipe = root / f"{slug}.yaml"
        recipe.write_text(f"{CALIBRATION}steps:\n  - {ROWS[label]}\n")
        out = root / slug
        r = run([sys.executable, "-m", "lmcompose.cli", "compress", "--model", args.model, "--recipe", str(recipe),
                 "--stream", "--eval", "none", "--overwrite", "--out", str(out)])
        if r["rc"] == 0:
            report = json.loads((out / "report.json").read_text())
            r["block_seconds"] = [round(s, 1) for s in report["block_seconds"]]
            r["bits_per_weight"] = round(8 * report["linear_bytes"] / report["linear_weights"], 3)
        r["label"], r["step"] = label, ROWS[label]
        results["rows"].append(r)
        print(label, r, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if all(r["rc"] == 0 for r in results["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
