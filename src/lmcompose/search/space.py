"""A declarative search space over recipes, cut by the hard rules and the byte budget before any work.

A space names a pool of techniques with the range of each hyperparameter, the longest chain `max_steps`
and the schedules to try. Every concrete recipe is type-checked and costed with ``Recipe.check`` on the
model's Linear shapes (no weights): a chain that breaks a hard rule or the budget is cut and never
evaluated. By default (``fit: last``) the last step of a chain is given ``ratio = budget`` in place of its
native knob, so it spends whatever the earlier steps left.

Method notes: docs/methods/search.md (chains, budgets, how the budget is split, grid or sampled)

Example (YAML, ``lmcompose search --space space.yaml``)::

    max_steps: 2
    schedules: [layer-major, step-major]
    techniques:
      wanda: {sparsity: [0.2, 0.3, 0.5], owl: [false, true]}
      svdllm: {ratio: [0.7, 0.8, 0.9]}
      gptq: {bits: [3, 4], group_size: [64, 128]}
      qer: {bits: [3, 4], group_size: [128]}
    extras:                        # placed around every chain, each a list of choices (null: off)
      rotate: [null, {per_head: true}]      # a model-level step leads the chain
      awq: [null, {}]                       # a group step starts the chain, on the grid of its quantizer
      reconstruct: [null, {steps: 50}]      # a block step ends the chain
      recover: [null, {steps: 128, loss: kl, train: scales}]   # the recipe's recovery block
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..algebra.spec import LinearSpec
from ..core.errors import IllegalStep
from ..core.messages import shown
from ..core.yamlsafe import load_file, parse_yaml
from ..recipe import CheckResult, Recipe
from ..techniques.fields import StrictModel
from ..techniques.registry import get_technique

log = logging.getLogger(__name__)

SCHEDULES = ("layer-major", "step-major")
EXTRA_UNITS = ("model", "group", "block")  # the units of steps placed around a chain (Technique.unit)
GRID_FIELDS = ("bits", "group_size", "symmetric", "scale_dtype")  # what a group step takes from its quantizer


class Range(StrictModel):
    """A continuous range for Optuna, or an integer one when both bounds (and the step, if given) are integers
    (``{low: 32, high: 256}`` samples integers, ``{low: 0.2, high: 0.6}`` floats). Bounds are finite numbers
    (no booleans or strings); a log range needs ``low > 0``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: int | float
    high: int | float
    log: bool = False
    step: int | float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _order(self):
        if not self.low < self.high:
            raise ValueError(f"range low={self.low} must be below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"range low={self.low}: a log range needs low > 0")
        return self

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) for v in (self.low, self.high)) and (self.step is None
                                                                          or isinstance(self.step, int))


Knob = Union[list, Range]


def _knob(where: str, value) -> Knob:
    if isinstance(value, dict):
        try:
            return Range(**{str(k): v for k, v in value.items()})
        except ValueError as err:
            raise ValueError(f"{where}: {' '.join(str(err).split())}") from None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{where}: an empty list of choices")
        return list(value)
    return [value]  # a fixed value is a choice of one


class StepSpace(BaseModel):
    """One technique of the pool and the ranges of its hyperparameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    technique: str
    knobs: dict[str, Knob] = Field(default_factory=dict)
    ratio_replaces: tuple[str, ...] | None = Field(None, description="knobs dropped when the step is given "
                                                   "ratio=budget (default: the technique's `ratio_replaces`)")

    @model_validator(mode="after")
    def _known(self):
        cls = get_technique(self.technique)
        for name in self.knobs:
            if name not in cls.model_fields:
                raise ValueError(f"techniques.{self.technique}.{name}: unknown key; allowed: {sorted(cls.model_fields)}")
        return self

    @property
    def family(self) -> str:
        return get_technique(self.technique).family

    def replaced(self) -> tuple[str, ...]:
        if self.ratio_replaces is not None:
            return self.ratio_replaces
        return get_technique(self.technique).ratio_replaces

    def can_fit(self) -> bool:
        return "ratio" in get_technique(self.technique).model_fields

    def searched(self, fitted: bool) -> dict[str, Knob]:
        """The knobs searched for this step; a fitted step loses `ratio` and the knobs ratio replaces."""
        if not fitted:
            return dict(self.knobs)
        return {k: v for k, v in self.knobs.items() if k != "ratio" and k not in self.replaced()}


class Budget(BaseModel):
    """At most `ratio` of the fp16 bytes of the compressed Linears, or at most `bits_per_weight`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ratio: float | None = Field(None, gt=0.0, le=1.0)
    bits_per_weight: float | None = Field(None, gt=0.0, le=16.0)

    @model_validator(mode="after")
    def _one(self):
        if (self.ratio is None) == (self.bits_per_weight is None):
            raise ValueError(f"give exactly one of ratio ({self.ratio}) and bits_per_weight ({self.bits_per_weight})")
        return self

    def step_ratio(self, shapes: dict[str, tuple[int, int]]) -> float:
        """The `ratio` a last step is given so that the chain meets this budget (see the module docstring)."""
        if self.ratio is not None:
            return self.ratio
        weights = sum(o * i for o, i in shapes.values())
        fp16 = sum(LinearSpec.dense(*s).dense_fp16_nbytes() for s in shapes.values())
        return min(1.0, self.bits_per_weight * weights / (8 * fp16))

    def value(self, check: CheckResult) -> float:
        """The budgeted quantity of a costed recipe."""
        return check.to_dict()["ratio"] if self.ratio is not None else check.bits_per_weight

    def meets(self, check: CheckResult) -> bool:
        return self.value(check) <= (self.ratio if self.ratio is not None else self.bits_per_weight) + 1e-9

    def describe(self) -> str:
        return f"ratio ≤ {self.ratio}" if self.ratio is not None else f"bits/weight ≤ {self.bits_per_weight}"


def chain_name(recipe: Recipe) -> str:
    """The steps of `recipe` in order, e.g. ``rotate → gptq → reconstruct + recover``."""
    return " → ".join(s.name for s in recipe.steps) + (" + recover" if recipe.recover.steps else "")


@dataclass(frozen=True)
class Candidate:
    recipe: Recipe
    check: CheckResult
    chain: str

    @property
    def key(self) -> str:
        return self.recipe.hash()


@dataclass(frozen=True)
class Cut:
    chain: str
    params: dict
    reason: str


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    techniques: dict[str, dict] = Field(description="{technique: {knob: [choices] | {low, high, log, step}}}")
    max_steps: int = Field(2, ge=1, le=4, description="longest chain k")
    schedules: tuple[Literal["layer-major", "step-major"], ...] = ("layer-major",)
    fit: Literal["last", "none"] = "last"
    joint_alone: bool = True
    one_per_family: bool = True
    max_grid: int = Field(5000, ge=1, description="largest product enumerated exhaustively")
    front_floor: float = Field(0.5, gt=0.0, le=1.0, description="NSGA-II: lowest last-step ratio, × budget")
    calibration: dict = Field(default_factory=dict, description="the recipes' calibration block")
    float_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    extras: dict[str, tuple[dict | None, ...]] = Field(
        default_factory=dict, description="steps placed around every chain by their unit, each a list of "
        "choices (null: off; a dict: the step's settings): a model-level step (rotate) leads, a group step (awq) "
        "follows it, before the chain's first step (it takes single dense weights), with the grid (bits, "
        "group_size, symmetric, scale_dtype) of the chain's first quantize step unless set (no quantizer: cut), "
        "a block step (reconstruct) ends the chain; 'recover' is the recipe's recovery")

    @field_validator("extras", mode="before")
    @classmethod
    def _extras(cls, v):
        out = {}
        for name, choices in (v or {}).items():
            where = f"extras.{name}"
            if name != "recover":
                unit = get_technique(name).unit  # unknown names: the registry's error lists the known ones
                if unit not in EXTRA_UNITS:
                    raise ValueError(f"{where}: {name} is a {unit} step; extras hold steps of unit "
                                     f"{'/'.join(EXTRA_UNITS)} and 'recover' (put {name} under techniques)")
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError(f"{where}: give a non-empty list of choices (null for off), got {choices!r}")
            norm = []
            for c in choices:
                if c is None or c is False:
                    norm.append(None)
                elif c is True:
                    norm.append({})
                elif isinstance(c, dict):
                    norm.append(dict(c))
                else:
                    raise ValueError(f"{where}: a choice is null (off), true or a dict of settings, got {c!r}")
            out[name] = tuple(norm)
        return out

    @property
    def needs_pipeline(self) -> bool:
        """Whether some choice places a step only the sequential pipeline can run (see `Recipe.needs_pipeline`)."""
        return any(c is not None for choices in self.extras.values() for c in choices)

    def extra_combinations(self) -> list[dict[str, dict | None]]:
        names = list(self.extras)
        return [dict(zip(names, combo)) for combo in itertools.product(*self.extras.values())]

    @field_validator("techniques")
    @classmethod
    def _steps(cls, v):
        if not v:
            raise ValueError("techniques: give at least one technique")
        out = {}
        for name, knobs in v.items():
            knobs = knobs or {}
            if isinstance(knobs, StepSpace):
                out[name] = knobs
                continue
            if not isinstance(knobs, dict) or any(not isinstance(k, str) for k in knobs):
                raise ValueError(f"techniques.{name}: got {shown(knobs)}: give a mapping of knob names to a list of "
                                 "choices, a fixed value or a range {low, high}")
            knobs = dict(knobs)
            replaces = knobs.pop("ratio_replaces", None)
            out[name] = StepSpace(technique=name, knobs={k: _knob(f"techniques.{name}.{k}", x) for k, x in knobs.items()},
                                  ratio_replaces=tuple(replaces) if replaces is not None else None)
        return out

    @classmethod
    def from_dict(cls, data) -> "SearchSpace":
        if not isinstance(data, dict) or any(not isinstance(k, str) for k in data):
            raise ValueError(f"a search space must be a mapping of settings (techniques, max_steps, ...), got "
                             f"{shown(data)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, text: str) -> "SearchSpace":
        return cls.from_dict(parse_yaml(text, "search space"))

    @classmethod
    def load(cls, path) -> "SearchSpace":
        """Read a space from a YAML (or .json) file (`core.yamlsafe.load_file`)."""
        return cls.from_dict(load_file(path, "search space"))

    def fingerprint(self) -> str:
        """A hash of everything that decides the trials (a resumed study must be over the same space)."""
        steps = {name: {"knobs": {k: v.model_dump() if isinstance(v, Range) else v for k, v in s.knobs.items()},
                        "ratio_replaces": s.ratio_replaces} for name, s in self.techniques.items()}
        data = {**self.model_dump(mode="json", exclude={"techniques"}), "techniques": steps}
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def pool(self) -> list[StepSpace]:
        return list(self.techniques.values())

    # -- chains --------------------------------------------------------------------------------
    def chains(self) -> list[tuple[StepSpace, ...]]:
        """Ordered chains of distinct pool entries, at most `max_steps` long, obeying the family rules."""
        out = []
        for k in range(1, self.max_steps + 1):
            for chain in itertools.permutations(self.pool, k):
                families = [s.family for s in chain]
                if self.joint_alone and k > 1 and "joint" in families:
                    continue
                if self.one_per_family and len(set(families)) < k:
                    continue
                out.append(chain)
        return out

    def _fitted(self, chain) -> bool:
        return self.fit == "last" and chain[-1].can_fit()

    def is_discrete(self) -> bool:
        return all(isinstance(k, list) for c in self.chains() for i, s in enumerate(c)
                   for k in s.searched(self._fitted(c) and i == len(c) - 1).values())

    def grid_size(self) -> int:
        total = 0
        for chain in self.chains():
            n = len(self.schedules) if len(chain) > 1 else 1
            for i, s in enumerate(chain):
                for k in s.searched(self._fitted(chain) and i == len(chain) - 1).values():
                    n *= len(k) if isinstance(k, list) else 10**9
            total += n
        return total * len(self.extra_combinations())

    # -- building and cutting ------------------------------------------------------------------
    def build(self, chain, params: list[dict], schedule: str, last_ratio: float | None,
              extras: dict[str, dict | None] | None = None, shapes=None) -> Recipe:
        """The recipe of `chain` with `params`, the last step given `last_ratio`, and the `extras` chosen placed
        around it (see the `extras` field); raises IllegalStep where an extra has no place in this chain."""
        steps = []
        for i, (s, p) in enumerate(zip(chain, params)):
            p = dict(p)
            if last_ratio is not None and i == len(chain) - 1:
                p["ratio"] = last_ratio
            steps.append({s.technique: p})
        lead, trail, recover = [], [], None
        for name, cfg in (extras or {}).items():
            if cfg is None:
                continue
            if name == "recover":
                recover = cfg
                continue
            unit = get_technique(name).unit
            if unit == "model":
                lead.append({name: cfg})
            elif unit == "block":
                trail.append({name: cfg})
            else:
                at = next((i for i, s in enumerate(chain) if s.family == "quantize"), None)
                if at is None:
                    raise IllegalStep(f"{name} prepares the grid of a quantizer and the chain has no quantize step")
                lead.append({name: {**self._grid_of(chain[at], steps[at][chain[at].technique], shapes), **cfg}})
        data = {"schedule": schedule, "float_dtype": self.float_dtype, "steps": lead + steps + trail}
        if self.calibration:
            data["calibration"] = self.calibration
        if recover is not None:
            data["recover"] = recover
        return Recipe.from_dict(data)

    @staticmethod
    def _grid_of(step: StepSpace, params: dict, shapes) -> dict:
        """The grid fields of the quantize step `step` with `params` (its bits resolved from a fitted ratio on
        the first shape: a uniform ratio gives every Linear of the same group size the same bits)."""
        cfg = get_technique(step.technique)(**params)
        grid = {k: getattr(cfg, k) for k in GRID_FIELDS if getattr(cfg, k, None) is not None}
        if getattr(cfg, "ratio", None) is not None and shapes:
            grid["bits"] = cfg.resolve_bits(LinearSpec.dense(*next(iter(shapes.values()))))
        return grid

    def admit(self, recipe: Recipe, shapes, budget: Budget) -> CheckResult:
        """Cost `recipe` on `shapes`; raise IllegalStep for a broken hard rule or a missed budget."""
        check = recipe.check(shapes)
        if not budget.meets(check):
            raise IllegalStep(f"over budget: {budget.value(check):.4f} > {budget.describe()}")
        return check

    def enumerate(self, shapes, budget: Budget) -> tuple[list[Candidate], list[Cut]]:
        """Every recipe of a discrete space, split into admitted candidates and cut ones (with reasons)."""
        if not self.is_discrete():
            raise ValueError("the space has continuous ranges: sample it with Optuna (suggest) instead")
        if self.grid_size() > self.max_grid:
            raise ValueError(f"the space holds {self.grid_size()} recipes, more than max_grid={self.max_grid}")
        fit = budget.step_ratio(shapes)
        kept, cut, seen = [], [], set()
        for chain in self.chains():
            fitted = self._fitted(chain)
            names = " → ".join(s.technique for s in chain)
            per_step = []
            for i, s in enumerate(chain):
                knobs = s.searched(fitted and i == len(chain) - 1)
                per_step.append([dict(zip(knobs, vals)) for vals in itertools.product(*knobs.values())])
            schedules = self.schedules if len(chain) > 1 else self.schedules[:1]
            for params, schedule, extras in itertools.product(itertools.product(*per_step), schedules,
                                                               self.extra_combinations()):
                try:
                    recipe = self.build(chain, list(params), schedule, fit if fitted else None, extras, shapes)
                    check = self.admit(recipe, shapes, budget)
                except (IllegalStep, ValueError) as err:  # a config the technique refuses is cut too
                    cut.append(Cut(names, {"schedule": schedule, "steps": list(params), "extras": extras},
                                       str(err)))
                    continue
                if recipe.hash() not in seen:
                    seen.add(recipe.hash())
                    kept.append(Candidate(recipe, check, chain_name(recipe)))
        log.info("search space: %d candidates admitted, %d cut", len(kept), len(cut))
        return kept, cut

    def suggest(self, trial, shapes, budget: Budget, front: bool = False) -> Candidate:
        """Sample one recipe define-by-run from an Optuna trial; raise IllegalStep if it must be cut."""
        chains = {" → ".join(s.technique for s in c): c for c in self.chains()}
        names = trial.suggest_categorical("chain", list(chains))
        chain = chains[names]
        fitted = self._fitted(chain)
        params = []
        for i, s in enumerate(chain):
            p = {}
            for k, knob in s.searched(fitted and i == len(chain) - 1).items():
                key = f"{names}/{i}.{s.technique}.{k}"
                if isinstance(knob, list):
                    p[k] = knob[0] if len(knob) == 1 else trial.suggest_categorical(key, knob)
                elif knob.is_int:
                    p[k] = trial.suggest_int(key, int(knob.low), int(knob.high), log=knob.log,
                                             step=int(knob.step or 1))
                else:
                    p[k] = trial.suggest_float(key, knob.low, knob.high, log=knob.log, step=knob.step)
            params.append(p)
        schedule = (trial.suggest_categorical(f"{names}/schedule", list(self.schedules))
                    if len(chain) > 1 and len(self.schedules) > 1 else self.schedules[0])
        ratio = None
        if fitted:
            ratio = budget.step_ratio(shapes)
            if front:
                ratio = trial.suggest_float(f"{names}/fit_ratio", self.front_floor * ratio, ratio)
        extras = {name: choices[trial.suggest_categorical(f"extra.{name}", list(range(len(choices))))]
                  if len(choices) > 1 else choices[0] for name, choices in self.extras.items()}
        try:
            recipe = self.build(chain, params, schedule, ratio, extras, shapes)
        except ValueError as err:
            raise IllegalStep(str(err)) from None
        return Candidate(recipe, self.admit(recipe, shapes, budget), chain_name(recipe))


DEFAULT_SPACE = {
    "max_steps": 2,
    "schedules": ["layer-major"],
    "techniques": {
        "sparsegpt": {"sparsity": [0.3, 0.5]},
        "wanda": {"sparsity": [0.2, 0.3, 0.4, 0.5], "owl": [False, True]},
        "svdllm": {"ratio": [0.7, 0.8, 0.9], "allocation": ["uniform", "sensitivity"]},
        "gptq": {"bits": [3, 4, 8], "group_size": [64, 128], "allocation": ["uniform", "sensitivity"],
                 "act_order": [True], "static_groups": [True]},
        "qer": {"bits": [2, 3, 4], "group_size": [128]},
    },
}


LOW_BITS = 3.5  # at or below this many bits per weight the default space places the quality extras
LOW_BITS_EXTRAS = {
    # R1 + R2 fused; or with online Hadamards on the o/down projections' inputs too (the Linears whose input
    # R1 does not rotate), block-diagonal of order 64: GPTQ w3 g64 on SmolLM2-135M, quick 54.47 -> 50.19 (full
    # width) -> 48.44 (blocks of 64), 0 bytes, a few percent of runtime (BENCHMARKS.md, issue 18)
    "rotate": [None, {"per_head": True},
               {"per_head": True, "online": True, "online_include": ["*o_proj", "*down_proj"], "block_size": 64}],
    "awq": [None, {}],
    "reconstruct": [None, {"train": "scales+rounding", "steps": 50}],
    "recover": [None, {"steps": 128, "loss": "kl", "train": "scales", "lr": 1e-5}],
}


def default_space(budget: Budget | None = None, **overrides) -> SearchSpace:
    """Two pruners (SparseGPT; Wanda, OWL on/off), one low-rank (SVD-LLM), one quantizer (GPTQ), one
    joint (QER); SVD-LLM and GPTQ with uniform or sensitivity allocation (the latter only where the step
    has `ratio` and comes first on a Linear; other combinations are cut before any work). GPTQ always uses
    act-order with static groups: it stores the same bytes as plain GPTQ (no permutation) and, on SmolLM2-135M
    at 3.2 bits/weight, cut the independent-level perplexity of GPTQ 3-bit g128 from 334 to 129 and of
    SparseGPT 50% → GPTQ 4-bit g128 from 127 to 111 (BENCHMARKS.md), so it is not worth a searched knob.

    Under a budget of at most `LOW_BITS` bits per weight (or the same ratio of the fp16 bytes), each chain may
    also take a rotation of the residual stream, AWQ scales before its quantizer, block-wise reconstruction
    and distillation (`LOW_BITS_EXTRAS`, each on or off): where bytes are scarce these are what keep quality
    (BENCHMARKS.md, "Quality at 2–4 bits"). They run only in the pipeline, so such a search scores at the
    independent or quick level, not the proxy."""
    base = dict(DEFAULT_SPACE)
    if budget is not None and (budget.bits_per_weight or 16 * budget.ratio) <= LOW_BITS:
        base["extras"] = LOW_BITS_EXTRAS
    return SearchSpace(**{**base, **overrides})
