"""Render benchmarks/results/*.jsonl into the tables of BENCHMARKS.md (between marker comments).

    python benchmarks/render.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "BENCHMARKS.md"


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    full = any("ppl_full" in r for r in rows)
    steps = any("step_seconds" in r for r in rows)  # tables written since issue 18 show where the time went
    head = ("| row | ppl |" + (" ppl full |" if full else "") + " bits/weight (compressed Linears) | kept of fp16 "
            "| total model bytes | file tensor bytes | bytes match | compress s | s/block | peak RSS MiB "
            "| mean layer rel. error |" + (" seconds per step |" if steps else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['row']} | failed: {r['error'][:80]} |" + " |" * (head.count("|") - 3))
            continue
        lines.append("| " + " | ".join([
            r["row"], fmt(r.get("ppl"), ".3f"), *([fmt(r.get("ppl_full"), ".3f")] if full else []),
            fmt(r.get("bits_per_weight"), ".3f"), fmt(r.get("ratio"), ".3f"),
            f"{r['total_bytes']:,}" if r.get("total_bytes") else "", f"{r['file_tensor_bytes']:,}"
            if r.get("file_tensor_bytes") else "", {True: "yes", False: "NO"}.get(r.get("bytes_match"), ""),
            fmt(r.get("compress_seconds"), ".1f"), fmt(r.get("seconds_per_block"), ".2f"),
            fmt(r.get("peak_rss_mib"), ".0f"), fmt(r.get("mean_rel_error"), ".3e"),
            *([_step_seconds(r)] if steps else [])]) + " |")
    return "\n".join(lines)


def _step_seconds(r: dict) -> str:
    """`rotate 12, gptq 130, reconstruct 610` (recovery: its own seconds), from bench.py's step_seconds."""
    parts = [f"{t['technique']} {t['seconds']:.0f}" for t in r.get("transforms") or [] if "seconds" in t]
    parts += [f"{k} {v:.0f}" for k, v in (r.get("step_seconds") or {}).items()]
    if (r.get("recovery") or {}).get("seconds") is not None:
        parts.append(f"recover {r['recovery']['seconds']:.0f}")
    return ", ".join(parts)


def section(path: Path) -> str:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    latest = {}
    for r in rows:  # the last run of a row wins
        latest[r["row"]] = r
    rows = list(latest.values())
    ok = [r for r in rows if not r.get("error")]
    meta = ok[0] if ok else rows[0]
    protocol = f"`{json.dumps(meta.get('protocol'))}`"
    full = next((r["protocol_full"] for r in ok if r.get("protocol_full")), None)
    if full:
        protocol += (f"; ppl full: `{json.dumps(full)}` (the saved checkpoint, `lmcompose eval --protocol full`; "
                     "rows run with `--full`)")
    limit = (meta.get("protocol") or {}).get("max_tokens")
    max_tokens = f" --max-tokens {limit}" if limit else ""
    dates = sorted({r.get("date") for r in ok if r.get("date")})
    steps = "\n".join(f"    {r['row']}: {json.dumps(r['recipe']['steps'])}"
                      + (f" recover: {json.dumps(r['recipe']['recover'])}" if "recover" in r["recipe"] else "")
                      for r in ok if r.get("recipe"))
    cal = next((r["recipe"]["calibration"] for r in ok if r.get("recipe")), None)
    return (f"Model `{meta.get('model')}`, machine: {meta.get('machine')}, dates {', '.join(dates)}.\n"
            f"Evaluation protocol: {protocol}.\n\n{table(rows)}\n\n"
            f"Reproduce: `python benchmarks/bench.py --table {meta.get('table')} --model {meta.get('model')} "
            f"--calib-n {cal['n'] if cal else 128}{max_tokens}{' --full' if full else ''} --only \"<row>\"`, which "
            f"writes each row's recipe (steps below, "
            f"calibration `{json.dumps(cal)}`) to a file and runs `lmcompose compress --model {meta.get('model')} "
            f"--recipe FILE --eval {meta.get('protocol_name')}` (dense: `lmcompose eval --protocol "
            f"{meta.get('protocol_name')}`).\n\n{steps}\n")


TASKS = ("boolq", "rte", "piqa", "winogrande", "openbookqa", "lambada_openai")


def run_rows() -> dict[str, dict]:
    """SmolLM2 benchmark rows by the folder name their checkpoint was saved under (``techniques-wanda_50pct``)."""
    rows = {}
    for path in sorted((HERE / "results").glob("*-smollm2-135m-quick-c4x128.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            m = re.search(r"--out \S*/([^/ ]+)", r.get("command") or "")
            rows[m.group(1) if m else f"{r['table']}-dense"] = r
    return rows


def quality_section() -> str:
    """Zero-shot accuracy (benchmarks/zeroshot/*.json) beside fidelity (benchmarks/fidelity/*.json)."""
    runs, lines = run_rows(), []
    head = ("| run | bits/weight | ppl quick | ppl full | " + " | ".join(TASKS) + " | mean acc | KL (nats) | top-1 agree |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for path in sorted((HERE / "zeroshot").glob("*.json"), key=lambda p: (p.stem != "smollm2-135m", p.stem)):
        z = json.loads(path.read_text())
        name = path.stem
        r = runs.get(name) or runs.get("techniques-dense" if name == "smollm2-135m" else "", {})
        fid = HERE / "fidelity" / f"{name}.json"
        f = json.loads(fid.read_text()) if fid.exists() else {}
        accs = [z["tasks"][t]["acc"] for t in TASKS if t in z["tasks"]]
        cells = [f"{z['tasks'][t]['acc']:.3f}" + (f" (norm {z['tasks'][t]['acc_norm']:.3f})" if "acc_norm" in
                 z["tasks"][t] else "") if t in z["tasks"] else "" for t in TASKS]
        label = "dense" if name == "smollm2-135m" else f"{r.get('table', '')}: {r.get('row', name)}"
        lines.append("| " + " | ".join([label, fmt(r.get("bits_per_weight"), ".3f"), fmt(r.get("ppl"), ".2f"),
                                        fmt(r.get("ppl_full"), ".2f"), *cells, f"{sum(accs) / len(accs):.3f}",
                                        fmt(f.get("kl_mean"), ".3f"), fmt(f.get("top1_agreement"), ".3f")]) + " |")
    return "\n".join(lines) + "\n"


# budget label -> (Budget field, limit, the search folders under benchmarks/search/ with their space)
SEARCHES = {"50% of fp16 bytes": ("ratio", 0.5, {"smollm2-0.5": "half-space, proxy level"}),
            "4.2 bits/weight": ("bits_per_weight", 4.2, {"smollm2-4.2": "budget-space, proxy level",
                                                          "smollm2-4.2-ao": "act-order-space, independent level"}),
            "3.2 bits/weight": ("bits_per_weight", 3.2, {
                "smollm2-3.2": "default space, proxy level, before the finalist fixes",
                "smollm2-3.2-pq": "prune-quant-space, proxy level",
                "smollm2-3.2-ind": "prune-quant-space, independent level",
                "smollm2-3.2-ord": "prune-quant-order-space, independent level"})}


def _steps_label(recipe: dict) -> str:
    def one(step):
        (name, params), = step.items()
        shown = ("sparsity", "ratio", "bits", "group_size", "pattern", "owl", "allocation", "act_order",
                 "static_groups")
        defaults = (None, False, "uniform", "unstructured")
        knobs = [f"{k}={params[k]}" for k in shown if params.get(k) not in defaults]
        return f"{name}({', '.join(knobs)})"
    return " → ".join(one(s) for s in recipe["steps"])


def search_section() -> str:
    """Per budget: the search's best recipe (benchmarks/search/<name>/summary.json, trials.json) beside the best
    one-step and two-step benchmark rows that fit the same budget, all on the full protocol."""
    rows = [r for r in run_rows().values() if r.get("ppl_full") is not None and r.get("recipe")]
    head = ("| budget | candidate | recipe | bits/weight | kept of fp16 | ppl full | held-out quick | trials | wall |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, (key, limit, folders) in SEARCHES.items():
        for name, space in folders.items():
            folder = HERE / "search" / name
            if not (folder / "summary.json").exists():
                lines.append(f"| {label} | search ({space}) not run yet | | | | | | | |")
                continue
            summary = json.loads((folder / "summary.json").read_text())
            trials = {t["number"]: t for t in json.loads((folder / "trials.json").read_text())}
            best = trials[summary["best"]["number"]]
            wall = summary.get("wall_seconds")
            lines.append(f"| {label} | **search best** ({space}; by {summary['best_by']}) | "
                         f"{_steps_label(best['recipe'])} | {best['bits_per_weight']:.3f} | {best['ratio']:.3f} | "
                         f"{fmt(best.get('full_ppl'), '.3f')} | {fmt(best.get('quick_ppl'), '.3f')} | "
                         f"{summary['trials']} | {'' if wall is None else f'{wall / 60:.0f} min'} |")
        fits = [r for r in rows if r[key] <= limit + 1e-9]
        for n_steps, what in ((1, "best one-step row"), (2, "best two-step row")):
            pool = [r for r in fits if len(r["recipe"]["steps"]) == n_steps]
            if pool:
                r = min(pool, key=lambda r: r["ppl_full"])
                lines.append(f"| {label} | {what}: {r['table']}: {r['row']} | {_steps_label(r['recipe'])} | "
                             f"{r['bits_per_weight']:.3f} | {r['ratio']:.3f} | {r['ppl_full']:.3f} | | | |")
    return "\n".join(lines) + "\n"


def speed_section() -> str:
    """benchmarks/speed/<run>_<dtype>.json written by benchmarks/speed.sh (one bench-speed per run and dtype)."""
    files = sorted(p for p in (HERE / "speed").glob("*_*.json") if p.name.startswith(("techniques-", "joint-")))
    head = ("| model | compute | forward path | prefill b1 tok/s | prefill b8 tok/s | decode tok/s | held MiB "
            "| peak RSS MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    runs_by_name, dense_done = run_rows(), set()
    for path in sorted(files, key=lambda p: (p.stem.rsplit("_", 1)[1], p.stem)):
        d = json.loads(path.read_text())
        dtype = d["config"]["dtype"]
        for run in d["runs"]:
            if run["label"] == "dense":
                if dtype in dense_done:
                    continue
                dense_done.add(dtype)
                name = "dense"
            else:
                r = runs_by_name.get(path.stem.rsplit("_", 1)[0], {})
                name = f"{r.get('row', path.stem)} ({fmt(r.get('bits_per_weight'), '.2f')} bits/weight)"
            paths = ", ".join(f"{k} ×{v}" for k, v in run["paths"].items()) or "–"
            policy = run["label"].split("/", 1)[1] if "/" in run["label"] else ""
            sp = run["speedup_vs_dense"]
            pre = lambda b: f"{run['prefill_tok_s'][b]:.0f}" + ("" if name == "dense" else f" ({sp['prefill'][b]:.2f}×)")
            dec = f"{run['decode_tok_s']:.1f}" + ("" if name == "dense" else f" ({sp['decode']:.2f}×)")
            lines.append(f"| {name} | {dtype} | {policy + ': ' if policy else ''}{paths} | {pre('1')} | {pre('8')} | "
                         f"{dec} | {run['held_bytes']['total'] / 2**20:.0f} | {run['peak_rss_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def export_section(path: Path) -> str:
    """benchmarks/export/export-<model>.jsonl written by bench_export.py: one row per (recipe, format)."""
    latest = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["row"], r["format"])] = r  # the last run of a row wins
    rows = list(latest.values())
    head = ("| row | format | stored as (Linears) | Linear bytes: ours | Linear bytes: in the file | file bytes "
            "| logits max diff | ppl ours | ppl re-loaded |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['row']} | {r['format']} | failed: {r['error'][:100]} | | | | | "
                         f"{fmt(r.get('ppl_ours'), '.3f')} | |")
            continue
        stored = ", ".join(f"{k} ×{v}" for k, v in r["stored"].items())
        lines.append(f"| {r['row']} | {r['format']} | {stored} | {r['linear_our_bytes']:,} | "
                     f"{r['linear_file_bytes']:,} | {r['file_bytes']:,} | {r['logits_max_diff']:.2e} | "
                     f"{r['ppl_ours']:.3f} | {r['ppl_reloaded']:.3f} |")
    meta = rows[0] if rows else {}
    recipes = "\n".join(f"    {name}: {json.dumps(steps)}" for name, steps in
                         {r["row"]: r["recipe"]["steps"] for r in rows}.items())
    return (f"Model `{meta.get('model')}`, machine: {meta.get('machine')}, dates "
            f"{', '.join(sorted({r['date'][:10] for r in rows}))}. Perplexity: protocol "
            f"`{json.dumps(meta.get('protocol'))}`, ours and the export re-loaded by transformers "
            "(compressed-tensors loader; GGUF loader with `gguf_file=`); logits max diff over 2 evaluation "
            "windows.\n\n" + "\n".join(lines) + f"\n\nReproduce: `OMP_NUM_THREADS=1 python benchmarks/bench_export.py "
            f"--model {meta.get('model')} --only \"<row>\"`.\n\n{recipes}\n")


def main() -> int:
    text = DOC.read_text()
    # peers-*.jsonl (benchmarks/peers/run_peer.py) are quoted in the text of their sections, not tabled here
    blocks = [(path.stem, section(path)) for path in sorted((HERE / "results").glob("*.jsonl"))
              if not path.name.startswith("peers-")]
    if any((HERE / "zeroshot").glob("*.json")):
        blocks.append(("zeroshot-fidelity-smollm2-135m", quality_section()))
    blocks.append(("search-vs-baselines-smollm2-135m", search_section()))
    blocks.append(("speed-smollm2-135m", speed_section()))
    blocks += [(path.stem, export_section(path)) for path in sorted((HERE / "export").glob("export-*.jsonl"))]
    for key, body in blocks:
        block = f"<!-- table:{key} -->\n{body}<!-- /table:{key} -->"
        pattern = re.compile(rf"<!-- table:{re.escape(key)} -->.*?<!-- /table:{re.escape(key)} -->", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: block, text)
        else:
            text += f"\n### {key}\n\n{block}\n"
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
