"""The study: Optuna trials over a `SearchSpace` on shared database storage (Ray tasks: `ray_runner`;
reading the finished study: `results`).

Scheduling is Optuna's and Ray's, never ours. Every worker opens the same study in an RDB storage
(SQLite by default, any SQLAlchemy URL for many machines); a killed study resumes by running the same
command again, and trials a killed process left RUNNING are re-queued through the storage's heartbeat.
A small discrete space is enumerated with ``GridSampler`` (the same trials and front after a kill); larger
ones use TPE, or NSGA-II for a front (seeded but adaptive: only the trial count is reproducible).

A study remembers what it searches (`StudySettings.identity`: model, budget, space, calibration, level, as
the study's user attribute ``identity``): resuming it with other settings is refused, naming what
differs, because its trials would be scored or budgeted otherwise (`claim_study`, `check_resume`).

Method notes: docs/methods/search.md

Example::

    lmcompose search --model smollm2-135m --budget 0.5 --trials 200 --out runs/search --workers 2
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..core.errors import IllegalStep
from ..core.messages import shown
from ..pipeline.dense_stats import DenseStats
from ..recipe import Recipe
from .objective import Evaluator
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
    identity: dict = field(default_factory=dict)  # what the study searches; a resumed study must match it

    def __post_init__(self):
        self.identity = json.loads(json.dumps(self.identity, default=str))  # as the storage gives it back
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not allowed; allowed: {list(SAMPLERS)}")
        if self.level not in LEVELS:
            raise ValueError(f"level={self.level!r} is not allowed; allowed: {list(LEVELS)}")

    def check_space(self, space: SearchSpace) -> None:
        """Refuse, before any work, a proxy-level search over a space with steps only the pipeline runs."""
        if self.level == "proxy" and space.needs_pipeline:
            raise ValueError(f"level='proxy' cannot score the space's extras ({', '.join(space.extras)}): they "
                             "run only in the sequential pipeline; use --level independent or quick")


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
    study = optuna.create_study(storage=storage, study_name=settings.study_name, directions=directions,
                                sampler=sampler_for(settings, problem), load_if_exists=True)
    claim_study(study, settings)
    return study


def _mismatch(stored: dict, settings: StudySettings) -> str | None:
    differ = [k for k, v in settings.identity.items() if k in stored and stored[k] != v]
    if not differ:
        return None
    what = "; ".join(f"{k}: {shown(stored[k])} in the study, {shown(settings.identity[k])} now" for k in differ)
    return (f"the study {settings.study_name!r} in {settings.storage} searched another problem ({what}); resume it "
            "with the same arguments, or start a new search with another --out (or --study-name)")


def claim_study(study, settings: StudySettings) -> None:
    """Record `settings.identity` on a new study; on a resumed one, raise ValueError naming what differs (a study
    created before identities were recorded takes this one)."""
    stored = study.user_attrs.get("identity")
    if stored is None:
        if settings.identity:
            study.set_user_attr("identity", settings.identity)
        return
    problem = _mismatch(stored, settings)
    if problem:
        raise ValueError(problem)


def check_resume(settings: StudySettings) -> bool:
    """Before any work: whether a study of this name exists in the storage, raising ValueError if it searched
    another problem (see `claim_study`). A SQLite file that does not exist yet is not created."""
    import optuna

    if settings.storage.startswith("sqlite:///") and not Path(settings.storage.removeprefix("sqlite:///")).is_file():
        return False
    try:
        study = optuna.load_study(study_name=settings.study_name, storage=settings.storage)
    except KeyError:  # no study of that name in the storage
        return False
    except ImportError:
        raise
    except Exception as err:  # noqa: BLE001 - a URL SQLAlchemy cannot parse or reach: name it
        raise ValueError(f"storage {settings.storage!r} cannot be opened ({type(err).__name__}: "
                         f"{' '.join(str(err).split())[:300]})") from None
    problem = _mismatch(study.user_attrs.get("identity") or {}, settings)
    if problem:
        raise ValueError(problem)
    return True


def score(evaluator: Evaluator, recipe: Recipe, level: str) -> tuple[float, dict | None]:
    """The trial's value, and at the proxy and independent levels what the recipe measured as it compressed
    every Linear (``{"ratio", "bits_per_weight"}``, plus the proxy's error as ``proxy_error`` at the
    independent level; None at the quick level, where the plan's sizes stand). At the independent level a
    recipe that needs the pipeline (`Recipe.needs_pipeline`) is measured as at the quick level: the same
    held-out perplexity, of the model the pipeline compressed."""
    if level == "quick" or (level == "independent" and recipe.needs_pipeline):
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




def load_dense(name: str, dtype: str = "fp32", device: str = "cpu", trust_remote_code: bool = False,
               verify: bool = True):
    """The model alone (a picklable factory for `EvaluatorSpec` via functools.partial); `verify` as in
    ``load_model`` (CLI: ``--no-verify``)."""
    from ..models.load import load_model

    return load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code, verify=verify)[0]
