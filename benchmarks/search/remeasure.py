"""Measured sizes for the finalists of a search run before trials recorded them (commit "search: trials
record the bytes the proxy measured"): the proxy compresses every Linear of each finalist's recipe and the
measured ratio and bits/weight replace the planned ones in trials.json and summary.json (the planned ones
are kept as planned_*).

    LMCOMPOSE_DATA_DIR=../shared/data python benchmarks/search/remeasure.py benchmarks/search/smollm2-3.2 \
        --cache /work/search/smollm2-3.2/cache
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmcompose.data import calibration_windows
from lmcompose.models.load import load_model
from lmcompose.recipe import Recipe
from lmcompose.search.objective import DenseStats, Evaluator


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cache", required=True)
    p.add_argument("--calib-n", type=int, default=128)
    p.add_argument("--heldout-n", type=int, default=8)
    args = p.parse_args()
    folder = Path(args.folder)
    trials = json.loads((folder / "trials.json").read_text())
    summary = json.loads((folder / "summary.json").read_text())
    model, tokenizer = load_model(args.model, dtype="fp32")
    windows = calibration_windows(tokenizer, n=args.calib_n + args.heldout_n, seqlen=512, seed=0)
    ev = Evaluator(model, DenseStats.load_or_compute(model, windows[:args.calib_n], args.cache, compute_dtype="auto"))
    for t in trials:
        if t.get("quick_ppl") is None or "planned_bits_per_weight" in t:
            continue
        got = ev.proxy(Recipe.from_dict(t["recipe"]))
        t["planned_ratio"], t["planned_bits_per_weight"] = t["ratio"], t["bits_per_weight"]
        t["ratio"], t["bits_per_weight"] = got.ratio, got.bits_per_weight
        t["size"] = got.ratio if summary["budget"]["ratio"] is not None else got.bits_per_weight
        print(f"trial {t['number']}: planned {t['planned_bits_per_weight']:.4f}, measured {got.bits_per_weight:.4f} "
              f"bits/weight (proxy {got.value:.6g}, recorded {t['score']:.6g})", flush=True)
        if summary["best"]["number"] == t["number"]:
            summary["best"].update({k: t[k] for k in ("ratio", "bits_per_weight", "size", "planned_ratio",
                                                      "planned_bits_per_weight")})
    (folder / "trials.json").write_text(json.dumps(trials, indent=1))
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
