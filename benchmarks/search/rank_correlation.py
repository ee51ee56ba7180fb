"""How well do the search's cheap levels rank recipes against the full protocol? (issue 6)

Every benchmark row measured on the full protocol (WikiText-2 test, seqlen 2048) is scored again by the
search's level-1 proxy (the parameter-weighted mean relative output error of every Linear compressed
independently from the dense statistics, `Evaluator.proxy`) and, with `--independent`, at the level-1b
"independent" level (held-out perplexity of the model holding those layers, `Evaluator.independent`),
and Spearman's ρ is reported for

* proxy ~ full, independent ~ full and quick ~ full over the benchmark rows (quick = the WikiText-2
  quick protocol the tables use), and
* proxy ~ full, independent ~ full and held-out quick ~ full over the search finalists, read from the
  searches' trials.json.

The proxy is computed with the searches' own settings (C4 calibration, the first `--calib-n` of
`--calib-n + --heldout-n` windows, seed 0) and their cached dense statistics when `--cache` points at a
search's cache folder.

    LMCOMPOSE_DATA_DIR=../shared/data python benchmarks/search/rank_correlation.py \
        --results benchmarks/results/*-smollm2-135m-quick-c4x128.jsonl \
        --searches benchmarks/search/smollm2-* --cache /work/search/smollm2-3.2-pq/cache \
        --independent --out benchmarks/search/rank-correlation
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmcompose.data import calibration_windows
from lmcompose.models.load import load_model
from lmcompose.recipe import Recipe
from lmcompose.search.objective import DenseStats, Evaluator, rank_correlation


def bench_rows(paths: list[str]) -> list[dict]:
    """Rows with a recipe, a quick and a full perplexity (the last line wins when a row was re-run)."""
    rows = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if r.get("recipe") and r.get("ppl_full") is not None and r.get("ppl") is not None:
                rows[(Path(path).name.split("-")[0], r["row"])] = r
    return [{"source": f"{table}: {row}", "recipe": r["recipe"], "quick": r["ppl"], "full": r["ppl_full"]}
            for (table, row), r in rows.items()]


def finalist_rows(dirs: list[str]) -> list[dict]:
    out = []
    for d in dirs:
        path = Path(d) / "trials.json"
        if not path.exists():
            print(f"skipping {d}: no trials.json (search not finished)")
            continue
        for t in json.loads(path.read_text()):
            if t.get("full_ppl") is not None:
                # a search at the independent level scores perplexity and records the proxy beside it
                independent = "proxy_error" in t
                out.append({"source": f"search {Path(d).name} trial {t['number']} ({t['chain']})",
                            "proxy": t["proxy_error"] if independent else t["score"],
                            "independent": t["score"] if independent else None,
                            "heldout_quick": t.get("quick_ppl"), "full": t["full_ppl"]})
    return out


def rho(rows: list[dict], a: str, b: str) -> dict:
    pairs = [(r[a], r[b]) for r in rows if r.get(a) is not None and r.get(b) is not None]
    value = rank_correlation([p[0] for p in pairs], [p[1] for p in pairs]) if len(pairs) >= 2 else None
    return {"spearman": value, "n": len(pairs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--results", nargs="+", required=True, help="benchmark JSONL files")
    p.add_argument("--searches", nargs="*", default=[], help="search output folders (trials.json)")
    p.add_argument("--cache", default="/tmp/lmcompose-rank-correlation-cache", help="dense statistics cache")
    p.add_argument("--calib-n", type=int, default=128)
    p.add_argument("--heldout-n", type=int, default=8)
    p.add_argument("--out", required=True, help="folder for rank-correlation.json and .md")
    p.add_argument("--exclude", nargs="*", default=["dam"],
                   help="techniques whose rows are left out (DAM's fit costs ~10 s per Linear at one thread)")
    p.add_argument("--independent", action="store_true",
                   help="also score every row at the search's independent level (held-out perplexity of the "
                        "independently compressed layers, `Evaluator.independent`)")
    args = p.parse_args()

    rows = [r for r in bench_rows(args.results)
            if not any(next(iter(step)) in args.exclude for step in r["recipe"]["steps"])]
    out = Path(args.out)
    known = {}  # levels measured by an earlier run (same source and recipe): not measured again
    if (out / "rank-correlation.json").exists():
        known = {(r["source"], json.dumps(r.get("recipe"), sort_keys=True)): r
                 for r in json.loads((out / "rank-correlation.json").read_text())["rows"] if "recipe" in r}
    model, tokenizer = load_model(args.model, dtype="fp32")
    windows = calibration_windows(tokenizer, n=args.calib_n + args.heldout_n, seqlen=512, seed=0)
    evaluator = Evaluator(model, DenseStats.load_or_compute(model, windows[:args.calib_n], args.cache,
                                                            compute_dtype="auto"), heldout=windows[args.calib_n:])
    for r in rows:
        t0 = time.perf_counter()
        old = known.get((r["source"], json.dumps(r["recipe"], sort_keys=True)), {})
        r["proxy"], r["independent"] = old.get("proxy"), old.get("independent")
        if r["proxy"] is None or (args.independent and r["independent"] is None):
            recipe = Recipe.from_dict(r["recipe"])
            if args.independent:
                r["independent"], result = evaluator.independent(recipe)
                r["proxy"] = result.value
            else:
                r["proxy"] = evaluator.proxy(recipe).value
        print(f"{r['source']}: proxy {r['proxy']:.4e}, independent {r['independent']}, quick {r['quick']:.3f}, "
              f"full {r['full']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finalists = finalist_rows(args.searches)
    both = rows + finalists
    result = {"benchmark rows": {"proxy~full": rho(rows, "proxy", "full"),
                                 "independent~full": rho(rows, "independent", "full"),
                                 "quick~full": rho(rows, "quick", "full"),
                                 "proxy~quick": rho(rows, "proxy", "quick")},
              "search finalists": {"proxy~full": rho(finalists, "proxy", "full"),
                                   "independent~full": rho(finalists, "independent", "full"),
                                   "heldout_quick~full": rho(finalists, "heldout_quick", "full")},
              "all": {"proxy~full": rho(both, "proxy", "full"), "independent~full": rho(both, "independent", "full")},
              "rows": both}
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank-correlation.json").write_text(json.dumps(result, indent=1))
    lines = ["| candidates | pair | Spearman ρ | n |", "|---|---|---:|---:|"]
    for group in ("benchmark rows", "search finalists", "all"):
        for pair, v in result[group].items():
            s = "–" if v["spearman"] is None else f"{v['spearman']:.3f}"
            lines.append(f"| {group} | {pair} | {s} | {v['n']} |")
    lines += ["", "| candidate | proxy | independent | quick | held-out quick | full |",
              "|---|---:|---:|---:|---:|---:|"]

    def f(v, spec):
        return "" if v is None else format(v, spec)
    for r in sorted(both, key=lambda r: r["full"]):
        lines.append(f"| {r['source']} | {f(r.get('proxy'), '.4e')} | {f(r.get('independent'), '.3f')} | "
                     f"{f(r.get('quick'), '.3f')} | "
                     f"{f(r.get('heldout_quick'), '.3f')} | {r['full']:.3f} |")
    (out / "rank-correlation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
