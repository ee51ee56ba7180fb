"""Technique registry: a config class per technique, registered under a short name.

A technique is a validated, frozen pydantic config whose methods are its handler:

* ``plan(spec) -> spec`` type-checks the step on a shapes-only :class:`LinearSpec` and returns what the
  layer will store (the costing ``Recipe.check`` runs before any weights exist);
* ``apply(layer, stats) -> (layer, info)`` does the work on one :class:`CompressedLinear` with the shared
  statistics of its inputs; ``info`` holds the native knobs actually used (sparsity, rank, bits…).

The tensor math lives in pure functions beside each config, so it can be tested without a model.
Registration is explicit (a decorator and one import line in ``techniques/__init__.py``); a duplicate
name is an error.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from ..algebra.spec import LinearSpec
from ..core.errors import IllegalStep
from .allocation import allocate_by_sensitivity
from .fields import StrictModel, check_settings

_REGISTRY: dict[str, type["Technique"]] = {}


class Technique(StrictModel):
    """Base config of every technique. Selection fields are shared by all of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    ratio_replaces: ClassVar[tuple[str, ...]] = ()  # the native knobs a `ratio` budget stands in for
    # What one call of the step works on (the sequential loop dispatches on it, never on names):
    #   "linear": `apply(layer, stats)` on each targeted Linear;
    #   "group":  `apply_group(layers, stats, context)` on the targeted Linears that share one input
    #             (e.g. q/k/v), which may fold a per-channel scale into the module producing that input;
    #   "block":  `apply_block(context)` once per decoder block, after the block's earlier steps;
    #   "model":  `transform_model(model, context)` once, before the sequential pass (leading steps only).
    unit: ClassVar[Literal["linear", "group", "block", "model"]] = "linear"
    # True when `apply` reads the weights alone and ignores the statistics (RTN, magnitude, plain SVD).
    statistic_free: ClassVar[bool] = False

    include: tuple[str, ...] = Field(("*",), description="globs (fnmatch, not regexes) over full Linear names")
    exclude: tuple[str, ...] = Field((), description="globs of Linear names to leave alone")
    true_sequential: bool = Field(False, description="compress a block's Linears group by group "
                                  "(attention inputs, attention output, MLP inputs, MLP output), "
                                  "observing each group after the previous one is compressed")

    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="how `ratio` is spread over the targeted Linears: the same everywhere, or per "
        "Linear by measured layer-error sensitivity within the same total bytes (techniques/allocation.py; "
        "a first step on dense weights only)")
    allocation_ratios: tuple[float, ...] = Field(
        (0.5, 0.75, 1.0, 1.25, 1.5), description="sensitivity allocation: candidate ratios per Linear, as "
        "multiples of `ratio` (capped at 1)")

    @model_validator(mode="after")
    def _allocation_needs_a_ratio(self):
        if self.allocation == "sensitivity" and getattr(self, "ratio", None) is None:
            raise ValueError(f"{self.name}: allocation='sensitivity' spreads a `ratio` budget over Linears; give "
                             "`ratio` (the fraction of fp16 bytes kept) instead of the native knob")
        if not self.allocation_ratios or any(m <= 0 for m in self.allocation_ratios):
            raise ValueError(f"allocation_ratios={list(self.allocation_ratios)!r} is not allowed; allowed: a "
                             "non-empty list of finite numbers > 0")
        return self

    def targets(self, linear_name: str) -> bool:
        return (any(fnmatchcase(linear_name, p) for p in self.include)
                and not any(fnmatchcase(linear_name, p) for p in self.exclude))

    def single_dense(self, spec: LinearSpec):
        """The one Dense term of `spec`; `IllegalStep` for any other structure."""
        if spec.kinds() != ("dense",):
            raise IllegalStep(f"{self.name} takes a single dense term, got {spec.describe()}")
        return spec.terms[0]

    def plan(self, spec: LinearSpec) -> LinearSpec:
        raise NotImplementedError

    def plan_for(self, name: str, spec: LinearSpec) -> LinearSpec:
        """`plan` for the Linear called `name` (a step whose plan depends on the Linear overrides this)."""
        return self.plan(spec)

    def apply(self, layer, stats):
        raise NotImplementedError

    def apply_group(self, layers: dict, stats, context) -> dict:
        """unit "group": ``{name: GroupResult}`` for the Linears `layers` that share one input with
        statistics `stats`; `context` (`techniques.apply.GroupContext`) folds scales into their producer."""
        raise NotImplementedError

    def apply_block(self, context) -> dict:
        """unit "block": ``{name: (layer, info)}`` for the block in `context` (`techniques.apply.BlockContext`)."""
        raise NotImplementedError

    def transform_model(self, model, context) -> dict:
        """unit "model": transform `model` in place before the sequential pass; returns a record."""
        raise NotImplementedError

    # -- capabilities: what the rules, the invariants and the costing ask of a step, never its name --
    @property
    def trains(self) -> bool:
        """True when the step trains continuous parameters by gradient steps (rule R5 wants it before the
        final quantization)."""
        return False

    @property
    def leaves_grid(self) -> bool:
        """True when the step may replace the codes of an earlier quantization (analysis only, e.g. an SVD
        of a quantized matrix); the codes-survive invariant (`algebra.invariants`) then does not apply."""
        return False

    @property
    def retrains_grid(self) -> frozenset[str]:
        """The parts of an earlier quantization the step retrains in place: a subset of {"scale", "zero",
        "codes"} (block reconstruction). The codes-survive invariant then compares only the other parts;
        the grid itself (bits, group size, scale dtype, permutation) and the bytes still survive, and
        retrained codes and zeros must stay on it (0..maxq)."""
        return frozenset()

    @property
    def prepares_grid(self):
        """The quantization grid (`algebra.quant.QuantSpec`) this step prepares its Linears' float weights for,
        or None: a scale search (AWQ) is worth its scales only if the next step on each Linear quantizes on
        that grid (rule R8 warns otherwise)."""
        return None

    @property
    def uses_statistics(self) -> bool:
        """False when the step's result depends on the weights alone (`statistic_free` techniques, unless
        they allocate their budget from a dense pre-pass): a recipe of such steps can run without
        calibration data (``calibration: {source: none}``), and then no calibration forward runs at all."""
        return not self.statistic_free or self.needs_prepass

    @property
    def needs_dense_input(self) -> bool:
        """True when the step must be the first on every Linear it targets because it measures the dense
        weights; `Recipe.check` refuses it on a compressed Linear, saying `dense_input_reason`."""
        return self.allocation == "sensitivity"

    @property
    def dense_input_reason(self) -> str:
        return "allocation='sensitivity' measures each Linear on the dense model"

    @property
    def needs_prepass(self) -> bool:
        """True when the step splits its budget across Linears from dense statistics (see `allocate`)."""
        return self.allocation == "sensitivity"

    def allocate(self, blocks: list[list[tuple]], *, float_dtype: str) -> dict[str, "Technique"]:
        """Per-Linear copies of this step, from a dense prepass: ``blocks[i]`` lists ``(name, weight, stats)``
        of block i's targeted Linears, computed on the uncompressed model (`pipeline.dense_stats`);
        `float_dtype` is the recipe's storage dtype of the weights. Only called if `needs_prepass`.
        The default is the sensitivity allocation (`techniques.allocation`)."""
        return allocate_by_sensitivity(self, blocks, float_dtype)

    def params(self) -> dict:
        return self.model_dump(mode="json")


def register(cls: type[Technique]) -> type[Technique]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in _REGISTRY:
        raise ValueError(f"technique name {cls.name!r} is registered twice "
                         f"({_REGISTRY[cls.name].__name__} and {cls.__name__})")
    check_settings(cls)
    _REGISTRY[cls.name] = cls
    return cls
