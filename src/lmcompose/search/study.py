"""The study: Optuna trials over a `SearchSpace`, on shared database storage or as Ray tasks.

Scheduling is Optuna's and Ray's, never ours:

* **Storage.** Every worker opens the same study (``load_if_exists=True``) in an RDB storage: SQLite by
  default (``sqlite:///<out>/study.db``) or any SQLAlchemy URL (``postgresql://...``) for many machines.
  Several processes (``--workers W`` starts W−1 more beside this one) or machines run ``study.optimize``
  on it; Optuna's ``MaxTrialsCallback`` stops all of them at ``--trials`` finished trials. A killed study
  resumes by running the same command again. Trials left RUNNING by a killed process are found by the
  storage's heartbeat (``heartbeat`` seconds, grace 2×) and re-queued once (``RetryHeartbeatStaleTrialCallback``).
* **Ray** (``--backend ray``, the optional extra ``lmcompose[search]``): the driver asks the study for
  trials (Optuna's ask-and-tell) and runs each evaluation as a Ray task on a local or remote cluster
  (``ray.init(address=...)``), keeping `workers` tasks in flight; Ray places them. Each Ray worker process
  builds its `Evaluator` once (model, cached dense statistics) and reuses it for later tasks.

**Samplers.** ``auto``: a discrete space small enough (``max_grid``) is enumerated exhaustively: the
admitted recipes (cut ones never become trials) are one categorical parameter ``recipe`` (their hashes)
under Optuna's ``GridSampler``; otherwise TPE (single objective: the level's score at the budget) or, with
``front=True``, NSGA-II on (bytes ratio or bits/weight, score). ``random`` is a seeded RandomSampler.

**What "the same" means after a kill.** ``GridSampler`` assigns grid point i to trial i and re-queues
failed points, so a killed and resumed grid study, with any number of workers, ends with the same set of
COMPLETE trials (one per admitted recipe) and the same objective values, hence the same front, as an
uninterrupted one. TPE and NSGA-II are seeded but adaptive: with parallel workers (or after a resume,
which restarts the sampler's random stream) the trials they propose depend on the order in which earlier
trials finished, so only the trial count is reproducible, not the front; compare fronts with the grid.

Outputs (`write_results`): ``front.json`` / ``front.md`` (non-dominated trials on bytes vs score),
``best.yaml`` (the best recipe, for ``lmcompose compress --recipe``), ``front.png``, ``trials.json``
and ``summary.json`` (rank correlations between levels).

Example::

    lmcompose search --model smollm2-135m --budget 0.5 --trials 200 --out runs/search --workers 2
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..recipe import Recipe
from ..registry import IllegalStep
from .objective import DenseStats, Evaluator, rank_correlation
from .space import Budget, Candidate, SearchSpace

log = logging.getLogger(__name__)
LEVELS = ("proxy", "independent", "quick")  # cheapest first (objective.py)
SAMPLERS = ("auto", "grid", "tpe", "nsga2", "random")


@dataclass
class EvaluatorSpec:
    """Everything a worker process (local or Ray) needs to build its `Evaluator`; picklable.

    `model` is a zero-argument callable returning the dense model (e.g. ``functools.partial(load_dense,
    "smollm2-135m")``); `cache_dir` holds the dense statistics computed once by the first worker.
    """

    model: Callable
    calib: torch.Tensor
    heldout: torch.Tensor | None
    cache_dir: str
    device: str | None = None
    name: str = "default"
    compute_dtype: str = "auto"  # of the forwards (dense statistics, compressing candidates, evaluation)

    def build(self) -> Evaluator:
        model = self.model()
        stats = DenseStats.load_or_compute(model, self.calib, self.cache_dir, compute_dtype=self.compute_dtype)
        return Evaluator(model, stats, calib=self.calib, heldout=self.heldout, device=self.device,
                         compute_dtype=self.compute_dtype)


@dataclass
class StudySettings:
    storage: str
    study_name: str = "lmcompose"
    sampler: str = "auto"
    seed: int = 0
    level: str = "independent"
    front: bool = False
    heartbeat: int | None = 60

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not allowed; allowed: {list(SAMPLERS)}")
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} is not allowed; allowed: {list(LEVELS)}")


@dataclass
class Problem:
    """The space, the model's shapes and the budget, with the admitted grid when the space is enumerated."""

    space: SearchSpace
    shapes: dict[str, tuple[int, int]]
    budget: Budget
    grid: dict[str, Candidate] | None = None
    cut: list = field(default_factory=list)

    @classmethod
    def make(cls, space: SearchSpace, shapes, budget: Budget, sampler: str = "auto") -> "Problem":
        enumerate_it = sampler == "grid" or (sampler == "auto" and space.is_discrete()
                                              and space.grid_size() <= space.max_grid)
        if not enumerate_it:
            return cls(space, shapes, budget)
        kept, cut = space.enumerate(shapes, budget)
        if not kept:
            raise ValueError(f"every recipe of the space breaks a hard rule or the budget ({budget.describe()}); "
                             f"first reasons: {[c.reason for c in cut[:3]]}")
        return cls(space, shapes, budget, {c.key: c for c in kept}, cut)

    def candidate(self, trial, front: bool) -> Candidate:
        """The trial's recipe; raises IllegalStep for a sampled recipe that must be cut (grid ones never are)."""
        if self.grid is not None:
            return self.grid[trial.suggest_categorical("recipe", list(self.grid))]
        return self.space.suggest(trial, self.shapes, self.budget, front=front)


def sampler_for(settings: StudySettings, problem: Problem):
    import optuna

    name = settings.sampler
    if problem.grid is not None:
        return optuna.samplers.GridSampler({"recipe": list(problem.grid)}, seed=settings.seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    if name == "nsga2" or (name == "auto" and settings.front):
        return optuna.samplers.NSGAIISampler(seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed)


def open_study(settings: StudySettings, problem: Problem):
    """Create the study in the storage, or load it (another worker, or a resumed run)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = {"connect_args": {"timeout": 120}} if settings.storage.startswith("sqlite") else None
    if settings.storage.startswith("sqlite:///"):
        Path(settings.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    hb = settings.heartbeat
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = RDBStorage(settings.storage, engine_kwargs=engine, heartbeat_interval=hb,
                             grace_period=2 * hb if hb else None,
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1) if hb
                             else None)
    directions = ["minimize", "minimize"] if settings.front else ["minimize"]
    return optuna.create_study(storage=storage, study_name=settings.study_name, directions=directions,
                               sampler=sampler_for(settings, problem), load_if_exists=True)


def score(evaluator: Evaluator, recipe: Recipe, level: str) -> tuple[float, dict | None]:
    """The trial's value, and at the proxy and independent levels what the recipe measured as it compressed
    every Linear (``{"ratio", "bits_per_weight"}``, plus the proxy's error as ``proxy_error`` at the
    independent level; None at the quick level, where the plan's sizes stand)."""
    if level == "quick":
        return evaluator.quick(recipe), None
    if level == "independent":
        value, result = evaluator.independent(recipe)
    else:
        result = evaluator.proxy(recipe)
        value = result.value
    sizes = {"ratio": result.ratio, "bits_per_weight": result.bits_per_weight}
    return value, sizes if level == "proxy" else {**sizes, "proxy_error": result.value}


def _record(trial, cand: Candidate, budget: Budget) -> float:
    trial.set_user_attr("recipe", cand.recipe.to_dict())
    trial.set_user_attr("chain", cand.chain)
    trial.set_user_attr("ratio", cand.check.to_dict()["ratio"])
    trial.set_user_attr("bits_per_weight", cand.check.bits_per_weight)
    trial.set_user_attr("worker", os.getpid())
    return budget.value(cand.check)


def _measured(trial, sizes: dict | None, budget: Budget, planned: float) -> float:
    """Replace the planned sizes of a trial by the measured ones (kept as planned_*; other measurements, such
    as ``proxy_error``, are stored as they are); returns its size. Sizes differ only for steps that allocate
    bytes across Linears; both are within the budget."""
    if sizes is None:
        return planned
    for key, value in sizes.items():
        if key in ("ratio", "bits_per_weight"):
            trial.set_user_attr(f"planned_{key}", trial.user_attrs[key])
        trial.set_user_attr(key, value)
    return sizes["ratio"] if budget.ratio is not None else sizes["bits_per_weight"]


def make_objective(problem: Problem, evaluator: Evaluator, settings: StudySettings):
    """The Optuna objective: pick (and cost) a recipe, cut it before any work if illegal, then score it."""
    import optuna

    def objective(trial):
        try:
            cand = problem.candidate(trial, settings.front)
        except IllegalStep as err:
            trial.set_user_attr("cut", str(err))
            raise optuna.TrialPruned(f"cut before any work: {err}") from None
        planned = _record(trial, cand, problem.budget)
        value, sizes = score(evaluator, cand.recipe, settings.level)
        size = _measured(trial, sizes, problem.budget, planned)
        return (size, value) if settings.front else value

    return objective


def run_local(problem: Problem, evaluator: Evaluator, settings: StudySettings, n_trials: int | None,
              callbacks=(), stop_after: int | None = None):
    """Run trials in this process on the shared study until `n_trials` trials are finished in the study
    (all workers together; grid: until the grid is exhausted). `stop_after` bounds this worker alone."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study = open_study(settings, problem)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    if problem.grid is not None and {t.params.get("recipe") for t in study.get_trials(False, states=done)} >= set(
            problem.grid):
        return study  # an exhausted grid (a resumed finished search): GridSampler would run one point again
    cbs = list(callbacks)
    if n_trials is not None:
        cbs.append(MaxTrialsCallback(n_trials, states=done))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(make_objective(problem, evaluator, settings), n_trials=stop_after, callbacks=cbs,
                   catch=())
    return study


def worker_main(spec: EvaluatorSpec, problem: Problem, settings: StudySettings, n_trials: int | None,
                barrier=None) -> None:
    """Entry point of an extra local worker process (multiprocessing, spawn)."""
    evaluator = spec.build()
    if barrier is not None:
        barrier.wait()
    run_local(problem, evaluator, settings, n_trials)


def start_workers(n: int, spec: EvaluatorSpec, problem: Problem, settings: StudySettings,
                  n_trials: int | None, barrier=None) -> list:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch threads start is unsafe
    procs = [ctx.Process(target=worker_main, args=(spec, problem, settings, n_trials, barrier), daemon=False)
             for _ in range(n)]
    for p in procs:
        p.start()
    return procs


# -- Ray ---------------------------------------------------------------------------------------------
_RAY_EVALUATORS: dict[str, Evaluator] = {}  # per Ray worker process: built once, reused by later tasks


def _ray_score(spec: EvaluatorSpec, recipe: dict, level: str) -> tuple[float, dict | None]:
    if spec.name not in _RAY_EVALUATORS:
        _RAY_EVALUATORS[spec.name] = spec.build()
    return score(_RAY_EVALUATORS[spec.name], Recipe.from_dict(recipe), level)


def run_ray(problem: Problem, spec: EvaluatorSpec, settings: StudySettings, n_trials: int, workers: int = 2,
            address: str | None = None, on_trial=None):
    """Ask-and-tell with the study in this process; every evaluation is a Ray task placed by Ray."""
    import optuna
    import ray

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    task = ray.remote(_ray_score)
    study = open_study(settings, problem)
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = len(study.get_trials(deepcopy=False, states=done_states))
    if problem.grid is not None:
        n_trials = min(n_trials, len(problem.grid))
    pending, spec_ref = {}, ray.put(spec)
    while finished + len(pending) < n_trials or pending:
        while len(pending) < workers and finished + len(pending) < n_trials:
            trial = study.ask()
            try:
                cand = problem.candidate(trial, settings.front)
            except IllegalStep as err:
                trial.set_user_attr("cut", str(err))
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                finished += 1
                continue
            size = _record(trial, cand, problem.budget)
            pending[task.remote(spec_ref, cand.recipe.to_dict(), settings.level)] = (trial, size)
        if not pending:
            break
        ready, _ = ray.wait(list(pending), num_returns=1)
        trial, planned = pending.pop(ready[0])
        value, sizes = ray.get(ready[0])
        size = _measured(trial, sizes, problem.budget, planned)
        _tell(study, trial, (size, value) if settings.front else value)
        finished += 1
        if on_trial:
            on_trial(study)
    return study


def _tell(study, trial, values) -> None:
    """``study.tell`` for ask-and-tell loops. Optuna's GridSampler calls ``study.stop()`` after the last
    grid point, which raises RuntimeError outside ``optimize`` (optuna/optuna#4121, #5141, documented in
    its GridSampler note); the value is already stored by then (``_tell`` stores it in a ``finally``), so
    that one error is expected and dropped."""
    import optuna

    try:
        study.tell(trial, values)
    except RuntimeError as err:
        if not (isinstance(study.sampler, optuna.samplers.GridSampler) and "Study.stop" in str(err)):
            raise


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


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows not dominated on (size, score), both minimised; sorted by size. Equal rows are all kept."""
    front = [r for r in rows if not any(o["size"] <= r["size"] and o["score"] <= r["score"]
                                        and (o["size"] < r["size"] or o["score"] < r["score"]) for o in rows)]
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
    return {"rows": rows, "front": pareto_front(rows), "best": best, "best_by": by.removesuffix("_ppl")}


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
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(study, budget)
    (out / "trials.json").write_text(json.dumps(summary["rows"], indent=1))
    (out / "front.json").write_text(json.dumps(summary["front"], indent=1))
    (out / "front.md").write_text(to_markdown(summary, budget))
    (out / "best.yaml").write_text(Recipe.from_dict(summary["best"]["recipe"]).to_yaml())
    info = {"best": {k: v for k, v in summary["best"].items() if k != "recipe"}, "best_by": summary["best_by"],
            "trials": len(summary["rows"]),
            "front": len(summary["front"]), "budget": budget.model_dump(), **(extra or {})}
    (out / "summary.json").write_text(json.dumps(info, indent=1))
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
    fig.savefig(out / "front.png", dpi=120)
    plt.close(fig)
    return summary


# -- command line ----------------------------------------------------------------------------------------
def load_dense(name: str, dtype: str = "fp32", device: str = "cpu", trust_remote_code: bool = False):
    """The model alone (a picklable factory for `EvaluatorSpec` via functools.partial)."""
    from ..models.load import load_model

    return load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)[0]


def add_parser(sub) -> None:
    s = sub.add_parser("search", help="search recipes (order, techniques, knobs) under a byte budget")
    s.add_argument("--model", default="smollm2-135m")
    b = s.add_mutually_exclusive_group(required=True)
    b.add_argument("--budget", type=float, help="fraction of the compressed Linears' fp16 bytes, e.g. 0.5")
    b.add_argument("--bits-per-weight", type=float, help="bits per weight of the compressed Linears, e.g. 4.2")
    s.add_argument("--trials", type=int, default=100, help="finished trials, all workers together")
    s.add_argument("--out", required=True)
    s.add_argument("--workers", type=int, default=1, help="local worker processes (or Ray tasks in flight)")
    s.add_argument("--backend", default="local", choices=["local", "ray"])
    s.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local one)")
    s.add_argument("--storage", default=None, help="SQLAlchemy URL (default sqlite:///<out>/study.db)")
    s.add_argument("--study-name", default="lmcompose")
    s.add_argument("--space", default=None, help="search space YAML (default: lmcompose.search.space.DEFAULT_SPACE)")
    s.add_argument("--sampler", default="auto", choices=list(SAMPLERS))
    s.add_argument("--front", action="store_true", help="two objectives (bytes, score): NSGA-II front")
    s.add_argument("--level", default=StudySettings.level, choices=list(LEVELS),
                   help="what each trial scores: independent (default: held-out perplexity of the model holding "
                        "the independently compressed layers), proxy (their weighted layer error, cheaper, ranks "
                        "worse: BENCHMARKS.md), quick (the real pipeline, then held-out perplexity)")
    s.add_argument("--finalists", type=int, default=10, help="best trials measured by quick perplexity")
    s.add_argument("--full-finalists", type=int, default=0, help="of those, how many get the full protocol")
    s.add_argument("--calib-n", type=int, default=32)
    s.add_argument("--calib-seqlen", type=int, default=512)
    s.add_argument("--heldout-n", type=int, default=8, help="held-out calibration windows for quick perplexity")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the dense weights in memory (the techniques read them)")
    s.add_argument("--compute-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype of the forwards (statistics, candidates, evaluation); auto = bf16 where faster")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    s.add_argument("--data-dir", default=None)
    s.add_argument("--trust-remote-code", action="store_true")
    s.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..data import calibration_windows
    from ..models.load import load_model, model_linear_shapes
    from .space import default_space

    console = Console(stderr=True)
    if args.heldout_n < 1 and (args.level != "proxy" or args.finalists > 0):
        raise ValueError(f"--heldout-n={args.heldout_n}: level {args.level!r} and --finalists={args.finalists} "
                         "score held-out perplexity; give --heldout-n >= 1, or --level proxy --finalists 0")
    out = Path(args.out)
    budget = Budget(ratio=args.budget) if args.budget is not None else Budget(bits_per_weight=args.bits_per_weight)
    calibration = {"n": args.calib_n, "seqlen": args.calib_seqlen, "seed": args.seed}
    if args.space:
        space = SearchSpace.from_yaml(Path(args.space).read_text())
        space = space.model_copy(update={"calibration": space.calibration or calibration})
    else:
        space = default_space(calibration=calibration)
    shapes, _ = model_linear_shapes(args.model, args.trust_remote_code)
    settings = StudySettings(storage=args.storage or f"sqlite:///{(out / 'study.db').resolve()}",
                             study_name=args.study_name, sampler=args.sampler, seed=args.seed, level=args.level,
                             front=args.front)
    problem = Problem.make(space, shapes, budget, args.sampler)
    if problem.grid is not None:
        console.print(f"grid: {len(problem.grid)} recipes admitted, {len(problem.cut)} cut before any work")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device,
                                  trust_remote_code=args.trust_remote_code)
    windows = calibration_windows(tokenizer, n=args.calib_n + args.heldout_n, seqlen=args.calib_seqlen,
                                  seed=args.seed, data_dir=args.data_dir)
    calib, heldout = windows[:args.calib_n], windows[args.calib_n:]
    factory = functools.partial(load_dense, args.model, args.dtype, args.device, args.trust_remote_code)
    spec = EvaluatorSpec(factory, calib, heldout, str(out / "cache"), args.device, name=args.model,
                         compute_dtype=args.compute_dtype)
    evaluator = Evaluator(model, DenseStats.load_or_compute(model, calib, spec.cache_dir,
                                                            compute_dtype=args.compute_dtype),
                          calib, heldout, compute_dtype=args.compute_dtype)
    total = min(args.trials, len(problem.grid)) if problem.grid is not None else args.trials
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as prog:
        task = prog.add_task("search", total=total)

        def show(study, _trial=None):
            rows = completed(study)
            best = min((t.values[-1] for t in rows), default=float("nan"))
            prog.update(task, completed=len(study.get_trials(deepcopy=False, states=_done())),
                        description=f"search (best {best:.4g})")

        if args.backend == "ray":
            study = run_ray(problem, spec, settings, total, args.workers, args.ray_address, on_trial=show)
        else:
            procs = start_workers(args.workers - 1, spec, problem, settings, total)
            study = run_local(problem, evaluator, settings, total, callbacks=[show])
            for p in procs:
                p.join()
    correlations = evaluate_finalists(study, evaluator, args.finalists, args.level,
                                      functools.partial(full_ppl, args, tokenizer), args.full_finalists)
    summary = write_results(study, budget, out, {"correlations": correlations,
                                                  "wall_seconds": time.perf_counter() - t0,
                                                  "cut_before_work": len(problem.cut)})
    console.print(to_markdown(summary, budget))
    console.print(f"rank correlations: {json.dumps(correlations)}")
    console.print(f"wrote {out}/front.json, front.md, front.png, best.yaml, trials.json, summary.json")
    return 0


def full_ppl(args, tokenizer, model) -> float:
    """Level 3: the full protocol (WikiText-2 test, seqlen 2048) of a compressed finalist."""
    from ..eval.perplexity import perplexity

    return perplexity(model, tokenizer, "full", data_dir=args.data_dir).ppl


def _done():
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)
