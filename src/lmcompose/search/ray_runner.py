"""Running a study's evaluations as Ray tasks (``--backend ray``, the optional extra ``lmcompose[search]``).

The driver asks the study for trials (Optuna's ask-and-tell) and runs each evaluation as a Ray task on a
local or remote cluster (``ray.init(address=...)``), keeping `workers` tasks in flight; Ray places them.
Each Ray worker process builds its `Evaluator` once (model, cached dense statistics) and reuses it.
"""

from __future__ import annotations

from ..core.errors import IllegalStep
from ..recipe import Recipe
from .objective import Evaluator
from .study import (
    EvaluatorSpec,
    Problem,
    StudySettings,
    _measured,
    _record,
    open_study,
    score,
)

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

