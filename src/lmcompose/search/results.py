"""Reading a finished study: the rows, the Pareto front, the best recipe, the finalists measured at dearer
levels, and the files a search writes (``front.json`` / ``front.md``: non-dominated trials on bytes vs
score; ``best.yaml``: the best recipe, for ``lmcompose compress --recipe``; ``front.png``; ``trials.json``;
``summary.json``: rank correlations between levels), each written atomically."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Callable

from ..core.io import atomic_file, write_json_atomically, write_text_atomically
from ..core.pareto import pareto_front
from ..recipe import Recipe
from .objective import Evaluator, rank_correlation
from .space import Budget


# -- results -------------------------------------------------------------------------------------------
def completed(study) -> list:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def _row(t, budget: Budget, levels: dict) -> dict:
    return {"number": t.number, "score": t.values[-1], "chain": t.user_attrs["chain"],
            "ratio": t.user_attrs["ratio"], "bits_per_weight": t.user_attrs["bits_per_weight"],
            "size": t.user_attrs["ratio"] if budget.ratio is not None else t.user_attrs["bits_per_weight"],
            **{k: t.user_attrs[k] for k in ("proxy_error",) if k in t.user_attrs},
            **{f"{k}_ppl": v for k, v in levels.get(t.number, {}).items()}, "recipe": t.user_attrs["recipe"]}


def front_rows(rows: list[dict]) -> list[dict]:
    """Rows not dominated on (size, score), both minimised; sorted by size. Equal rows are all kept."""
    front = [rows[i] for i in pareto_front([(r["size"], r["score"]) for r in rows])]
    return sorted(front, key=lambda r: (r["size"], r["score"]))


def summarize(study, budget: Budget) -> dict:
    levels = finalist_levels(study)
    rows, seen = [], set()
    for t in sorted(completed(study), key=lambda t: t.number):
        # Parallel workers may evaluate one grid point twice (Optuna's GridSampler allows it): count it once.
        key = json.dumps(t.user_attrs["recipe"], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            rows.append(_row(t, budget, levels))
    if not rows:
        raise ValueError("the study has no completed trial")
    # The best recipe is judged by the dearest level measured: full protocol, else quick, else the score.
    for by in ("full_ppl", "quick_ppl", "score"):
        measured = [r for r in rows if r.get(by) is not None]
        if measured:
            best = min(measured, key=lambda r: (r[by], r["number"]))
            break
    return {"rows": rows, "front": front_rows(rows), "best": best, "best_by": by.removesuffix("_ppl")}


def finalist_levels(study) -> dict[int, dict]:
    """``{trial number: {"quick": ppl, "full": ppl}}`` measured for finalists (study user attributes,
    since a finished trial cannot be updated)."""
    return {int(k.split("/")[1]): v for k, v in study.user_attrs.items() if k.startswith("finalist/")}


def finalist_trials(study, k: int, span_chains: bool = True) -> list:
    """The k trials measured beyond the score. With `span_chains` (the proxy level): the best of each chain
    first (chains ordered by their best score), then the second best of each, and so on. The proxy ranks
    recipes of one chain well but misranks across chains (on SmolLM2 at 3.2 bits it put 3-bit GPTQ ahead of
    pruning + 4-bit GPTQ, which the full protocol rates 26% better), so the finalists span chains and the
    dearer levels choose between them. Without it (the perplexity levels, which rank across chains at
    Spearman 0.94 against the full protocol on SmolLM2): the k best scores, so that a finalist is not spent
    on a chain's best that is hopeless (a 4,226-perplexity pruning-only chain at 4.2 bits/weight, where
    the best scored 56). Trials that share a recipe (two workers on one grid point) count once."""
    by_chain, seen = {}, set()
    for t in sorted(completed(study), key=lambda t: (t.values[-1], t.number)):
        key = json.dumps(t.user_attrs["recipe"], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            by_chain.setdefault(t.user_attrs["chain"] if span_chains else None, []).append(t)
    rounds = itertools.zip_longest(*by_chain.values())
    return [t for level in rounds for t in level if t is not None][:k]


def evaluate_finalists(study, evaluator: Evaluator, k: int, level: str = "proxy",
                       full: Callable | None = None, n_full: int = 0) -> dict:
    """Quick perplexity of the k finalists (`finalist_trials`), then ``full(model) -> ppl`` of the n_full best *by
    quick perplexity* (each level picks from the one below it: on SmolLM2 at 3.2 bits the proxy put a
    sensitivity-allocated GPTQ first, held-out perplexity put uniform GPTQ first, and the full protocol
    agreed with the latter, 78.8 against 97.5). Levels are stored in the study, so a resumed search measures
    only what is missing. Returns Spearman's ρ between every pair of levels over the trials measured at
    both (``{"proxy~quick": {"spearman": ρ, "n": n}, ...}``). Trials that share a recipe (two workers on one
    grid point) are measured once. A full finalist is compressed again (one compressed copy in memory at
    a time)."""
    trials = finalist_trials(study, k, span_chains=level == "proxy")
    known = finalist_levels(study)

    def measure(t, quick: bool, with_full: bool) -> None:
        got = dict(known.get(t.number, {}))
        quick, with_full = quick and "quick" not in got, with_full and "full" not in got
        if quick or with_full:
            model = evaluator.compressed(Recipe.from_dict(t.user_attrs["recipe"]))
            if quick:
                got["quick"] = evaluator.quick(None, model=model)
            if with_full:
                got["full"] = full(model)
            del model
        study.set_user_attr(f"finalist/{t.number}", got)
        known[t.number] = got

    quick_level = level != "quick" and evaluator.heldout is not None
    by_quick = []
    for i, t in enumerate(trials):
        # without a quick level the full protocol goes to the best trials by score
        measure(t, quick_level, full is not None and not quick_level and i < n_full)
        by_quick.append(t)
    if full is not None and quick_level:
        by_quick.sort(key=lambda t: (known[t.number].get("quick", math.inf), t.number))
        for t in by_quick[:n_full]:
            measure(t, False, True)
    columns = {level: [t.values[-1] for t in trials]}
    if level == "independent":
        columns["proxy"] = [t.user_attrs.get("proxy_error") for t in trials]
    for name in ("quick", "full"):
        if name != level:
            columns[name] = [known[t.number].get(name) for t in trials]
    out, names = {}, list(columns)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pairs = [(x, y) for x, y in zip(columns[a], columns[b]) if x is not None and y is not None]
            if len(pairs) >= 2:
                rho = rank_correlation([p[0] for p in pairs], [p[1] for p in pairs])
                out[f"{a}~{b}"] = {"spearman": None if math.isnan(rho) else rho, "n": len(pairs)}
    return out


def to_markdown(summary: dict, budget: Budget) -> str:
    size = "ratio" if budget.ratio is not None else "bits/weight"
    b = summary["best"]

    def fmt(v):
        return "" if v is None else f"{v:.6g}"

    def table(title, rows):
        out = [title, "", f"| trial | chain | {size} | score | quick ppl | full ppl |", "|---|---|---|---|---|---|"]
        out += [f"| {r['number']} | {r['chain']} | {r['size']:.4f} | {r['score']:.6g} | {fmt(r.get('quick_ppl'))} | "
                f"{fmt(r.get('full_ppl'))} |" for r in rows]
        return out

    measured = "".join(f", {k} ppl {b[f'{k}_ppl']:.6g}" for k in ("quick", "full") if b.get(f"{k}_ppl") is not None)
    lines = [f"# Search ({budget.describe()})", "",
             f"best by {summary.get('best_by', 'score')}: trial {b['number']}, {b['chain']}, {size} {b['size']:.4f}, "
             f"score {b['score']:.6g}{measured}", ""]
    finalists = [r for r in summary["rows"] if r.get("quick_ppl") is not None or r.get("full_ppl") is not None]
    if finalists:
        key = "full_ppl" if any(r.get("full_ppl") is not None for r in finalists) else "quick_ppl"
        finalists.sort(key=lambda r: (r.get(key) is None, r.get(key) or 0.0, r["number"]))
        lines += table("## Finalists", finalists) + [""]
    lines += table("## Pareto front (size, score)", summary["front"])
    return "\n".join(lines) + "\n"


def write_results(study, budget: Budget, out: str | os.PathLike, extra: dict | None = None) -> dict:
    """front.json, front.md, best.yaml, front.png, trials.json, summary.json under `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    summary = summarize(study, budget)
    write_json_atomically(out / "trials.json", summary["rows"], indent=1)
    write_json_atomically(out / "front.json", summary["front"], indent=1)
    write_text_atomically(out / "front.md", to_markdown(summary, budget))
    write_text_atomically(out / "best.yaml", Recipe.from_dict(summary["best"]["recipe"]).to_yaml())
    info = {"best": {k: v for k, v in summary["best"].items() if k != "recipe"}, "best_by": summary["best_by"],
            "trials": len(summary["rows"]),
            "front": len(summary["front"]), "budget": budget.model_dump(), **(extra or {})}
    write_json_atomically(out / "summary.json", info, indent=1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["size"] for r in summary["rows"]], [r["score"] for r in summary["rows"]], s=10, alpha=0.5,
               label="trials")
    front = summary["front"]
    ax.plot([r["size"] for r in front], [r["score"] for r in front], "r.-", label="Pareto front")
    ax.set_xlabel("fraction of fp16 bytes" if budget.ratio is not None else "bits per weight")
    ax.set_ylabel("score (lower is better)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    with atomic_file(out / "front.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return summary

