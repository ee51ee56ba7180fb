"""Recipes: an ordered list of technique steps, a schedule, and the calibration set (DESIGN §5).

A recipe is validated when it is built (unknown keys and bad values raise ``ValueError`` naming the
field, the value and what is allowed), serialises to YAML/JSON and back, and has a stable hash that
names results and caches. ``Recipe.check(shapes)`` type-checks the chain on every targeted Linear and
computes the bytes of the result before any weights are loaded.

Example::

    schedule: layer-major
    calibration: {source: c4, n: 128, seqlen: 512, seed: 0}
    steps:
      - magnitude: {sparsity: 0.5}
      - rtn: {bits: 4, group_size: 64, target: sparse}
    recover: {steps: 200, lr: 1.0e-4}   # optional: fine-tune of the float factors (or scales) afterwards

Recipe files are read by `core.yamlsafe` (plain YAML or JSON, one document, each key once, a size, depth and
alias-expansion limit). Values are strict (`techniques.fields.strict_values`: no boolean or string taken
as a number, floats finite, counts bounded). A recipe read from a mapping or a file has at least one step, and a recipe whose
compressed Linears would take more bytes than they take uncompressed (dense in fp16, or in `float_dtype`
where that is wider) is refused by `check` unless it says ``allow_growth: true``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .algebra.spec import LinearSpec
from .core.errors import IllegalStep
from .core.messages import shown
from .core.yamlsafe import load_file, parse_yaml
from .techniques.base import Technique
from .techniques.fields import SEED_LIMIT, StrictModel, joined_parts, only_with
from .techniques.registry import get_technique, registry

_FIELD_MESSAGE = re.compile(r"^[A-Za-z_]\w*: got ")


def _key(key) -> str:
    """A key as a message names it: as written when it is a short string, else quoted and cut."""
    return key if isinstance(key, str) and len(key) <= 80 else shown(key)


def _format_error(prefix: str, err: ValidationError) -> str:
    """One line per problem: `where: got value: what is allowed` (our own messages pass through)."""
    parts = []
    for e in err.errors():
        loc = ".".join(_key(x) for x in (prefix, *e["loc"]) if x != "")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        if msg.startswith("steps[") or not loc:
            parts.append(msg)
        elif e["type"] == "value_error" and _FIELD_MESSAGE.match(msg):  # strict_values: "FIELD: got VALUE: ..."
            parts.append(f"{loc}.{msg}")
        elif e["type"] == "value_error" and not e["loc"]:
            parts.append(f"{loc}: {msg}")
        else:
            parts.append(f"{loc}: got {shown(e.get('input'))}: {msg}")
    return "; ".join(parts)


def build_step(entry, index: int = 0) -> Technique:
    """One step from ``{name: {params}}`` (or a Technique instance)."""
    if isinstance(entry, Technique):
        return entry
    where = f"steps[{index}]"
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError(f"{where}: got {shown(entry)}: each step must be a mapping with exactly one key, the "
                         f"technique name; allowed names: {sorted(registry())}")
    (name, params), = entry.items()
    cls = get_technique(name) if isinstance(name, str) and name in registry() else None
    if cls is None:
        raise ValueError(f"{where}: unknown technique {shown(name)}; allowed: {sorted(registry())}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValueError(f"{where}.{name}: got {shown(params)}: parameters must be a mapping")
    allowed = sorted(cls.model_fields)
    unknown = [k for k in params if not isinstance(k, str) or k not in allowed]
    if unknown:
        raise ValueError(f"{where}.{name}.{_key(unknown[0])}: unknown key; allowed keys: {allowed}")
    try:
        return cls(**params)
    except ValidationError as err:
        raise ValueError(_format_error(f"{where}.{name}", err)) from None


NO_CALIBRATION = "none"  # calibration.source of a recipe that needs no calibration data


class Calibration(StrictModel):
    """Where the calibration windows come from. The source's name is checked when the recipe is built; whether
    its file is there, by `resolve` (``recipe check`` and ``compress`` call it before any weights load)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field("c4", description="named source (c4, wikitext2), a local .txt/.jsonl/.parquet file, or none "
                        "(no calibration: only steps that read the weights alone, e.g. rtn, magnitude, svd; no "
                        "calibration forward runs and each Linear's error is measured on its weights)")
    split: str = Field("validation", description="split of a named source")
    n: int = Field(128, ge=1, description="number of calibration windows")
    seqlen: int = Field(512, ge=8, description="tokens per window")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="seed of the window sampler (its own generator)")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")

    @model_validator(mode="after")
    def _known_source(self):
        from .data.text import LOCAL_SUFFIXES, NAMED

        if self.none:
            return self
        if Path(self.source).suffix not in LOCAL_SUFFIXES and (self.source, self.split) not in NAMED:
            named = sorted(f"{s} (split {sp})" for s, sp in NAMED)
            raise ValueError(f"source={shown(self.source)} split={shown(self.split)} is not known; allowed: "
                             f"{', '.join(named)}, or a local {'/'.join(LOCAL_SUFFIXES)} file")
        return self

    @property
    def none(self) -> bool:
        """Whether the recipe runs without calibration data (``source: none``)."""
        return self.source == NO_CALIBRATION

    def resolve(self, data_dir=None) -> Path | None:
        """The local file the windows will be read from, or None for the hub's copy of a named source.

        Raises:
            FileNotFoundError: a local file that does not exist, or a named source found neither in the data
                directory nor on a usable hub (`data.text.resolve_file`; the message says where to put it).
        """
        from .data.text import resolve_file

        return None if self.none else resolve_file(self.source, self.split, data_dir)


TRAINABLE = ("lowrank", "sparse", "scales")  # what recovery can train, in the order `train` is written


class Recovery(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(0, ge=0, description="optimizer steps; 0 = no recovery")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    batch_size: int = Field(1, ge=1, description="calibration windows per step")
    train: str = Field(
        "lowrank", description="what trains, '+'-joined (or a list): lowrank (the float low-rank factors), sparse "
                               "(the float sparse values, inside their masks), scales (the scales of quantized "
                               "tensors, codes fixed: EfficientQAT's E2E-QP)")
    loss: Literal["lm", "kl"] = Field(
        "lm", description="lm: causal-LM loss on the windows; kl: KL(dense teacher || model) of the next-token "
                          "distributions (distillation)")
    teacher: Literal["cached", "online"] = Field(
        "cached", description="with loss: kl: cached = the dense model's top-k log-probabilities computed before "
                              "the steps; online = a copy of the dense model, run on every batch (a second model)")
    top_k: int = Field(64, ge=1, description="with teacher: cached: tokens kept per position (plus the tail's mass)")
    heldout: int = Field(0, ge=0, description="the last calibration windows held out of training, to report a "
                                              "held-out loss before and after")
    windows: int | None = Field(
        None, ge=1, description="windows recovery trains on (and holds out from), drawn from the calibration "
                                "source with its seed and seqlen: the first calibration.n of them are the windows "
                                "the steps calibrate on, the rest more text for recovery alone (distillation on "
                                "128 windows fits them, not the distribution); at least calibration.n; "
                                "none = the calibration windows")
    checkpoint_every: int = Field(
        16, ge=0, description="with a work directory (compress --resume): every this many steps, and after the "
                              "last, save the trained tensors, the AdamW moments and the step there "
                              "(training.recover), so a killed recovery resumes from its last save, "
                              "bit-identically; each save rewrites one file of 12 bytes per trained number; "
                              "0 = never (a resume then starts the recovery over)")

    @field_validator("train", mode="before")
    @classmethod
    def _train(cls, value):
        return joined_parts(value, TRAINABLE, "lowrank+scales")

    @model_validator(mode="after")
    def _teacher_needs_kl(self):
        only_with(self, ("teacher", "top_k"), self.loss == "kl", "needs loss: kl")
        # steps: 0 is no recovery, written as no `recover` block: a setting of it would be lost on the way
        only_with(self, [f for f in Recovery.model_fields if f != "steps"], self.steps > 0,
                  "needs steps > 0 (steps: 0 is no recovery)")
        return self

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.train.split("+"))

    @property
    def scales(self) -> bool:
        """Whether the scales of quantized tensors train (their codes and zero points stay fixed)."""
        return "scales" in self.parts

    def trains(self, kind: str) -> bool:
        """Whether the float tensors of a term of this kind train."""
        return kind in self.parts

    def trainable(self, spec: LinearSpec) -> bool:
        """Whether a Linear of this planned structure has a tensor this recovery trains: a float tensor of a
        listed kind in a term with nothing quantized, or (with scales) any quantized tensor."""
        for term in spec.terms:
            quantized = any(t.quantized for t in term.tensors().values())
            if (self.scales and quantized) or (self.trains(term.kind) and not quantized):
                return True
        return False

    def to_dict(self) -> dict:
        """The settings; the distillation, held-out and checkpoint fields only where they are not at their
        defaults, so recipes written before them keep their hashes."""
        out = self.model_dump()
        return {k: v for k, v in out.items() if k not in _LATER_FIELDS or v != Recovery.model_fields[k].default}


_LATER_FIELDS = ("loss", "teacher", "top_k", "heldout", "checkpoint_every", "windows")


class Recipe(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schedule: Literal["layer-major", "step-major"] = "layer-major"
    float_dtype: Literal["fp16", "bf16", "fp32"] = Field(
        "fp16", description="storage dtype of float tensors (values, factors, non-compressed weights)")
    calibration: Calibration = Calibration()
    steps: tuple[Technique, ...] = ()
    recover: Recovery = Field(Recovery(), description="optional fine-tune after the steps, on the causal-LM "
                                                      "loss or a KL to the dense model (training.recover); "
                                                      "steps: 0 = off")
    allow_growth: bool = Field(False, description="accept a recipe whose compressed Linears take more bytes than "
                                                  "they take uncompressed (refused by `check` otherwise)")

    @field_validator("steps", mode="before")
    @classmethod
    def _build_steps(cls, steps):
        if steps is None:
            return ()
        if not isinstance(steps, (list, tuple)):
            raise ValueError(f"steps must be a list of {{technique: {{params}}}} mappings, got {shown(steps)}")
        return tuple(build_step(s, i) for i, s in enumerate(steps))

    @field_validator("recover")
    @classmethod
    def _heldout_leaves_training_windows(cls, recover: Recovery, info: ValidationInfo):
        n = info.data["calibration"].n if "calibration" in info.data else None
        if n is not None and recover.windows is not None and recover.windows < n:  # set only with steps > 0
            raise ValueError(f"windows={recover.windows} is fewer than the calibration windows it starts with "
                             f"(calibration.n={n}); allowed: none or an integer >= {n}")
        n = recover.windows or n
        if recover.steps and n is not None and recover.heldout >= n:
            raise ValueError(f"heldout={recover.heldout} leaves no window to train on ("
                             f"{'recover.windows' if recover.windows else 'calibration.n'}={n})")
        return recover

    @model_validator(mode="after")
    def _calibration_free(self):
        """``calibration: {source: none}`` runs no calibration forward: every step must read the weights alone."""
        if not self.calibration.none:
            return self
        for i, step in enumerate(self.steps):
            if step.uses_statistics or step.unit != "linear":
                free = sorted(n for n, cls in registry().items() if cls.statistic_free)
                raise ValueError(f"steps[{i}].{step.name} needs calibration statistics, and calibration.source is "
                                 f"none; allowed without calibration: {', '.join(free)} (without allocation: "
                                 "sensitivity), or set calibration.source (e.g. c4)")
        if self.recover.steps:
            raise ValueError("recover trains on calibration windows, and calibration.source is none; set "
                             "calibration.source (e.g. c4) or drop recover")
        return self

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ValueError(_format_error("", err)) from None

    # -- (de)serialisation ---------------------------------------------------------------------
    @property
    def window_count(self) -> int:
        """How many windows to draw from the calibration source: ``calibration.n``, or ``recover.windows`` when
        the recovery trains on more (the sampler draws in order, so the first ``calibration.n`` are the same
        windows either way)."""
        return self.recover.windows or self.calibration.n  # recover.windows is refused without steps

    @property
    def needs_pipeline(self) -> bool:
        """Whether a step works on more than one Linear (a model, group or block step) or the recipe trains
        the model afterwards: such a recipe runs only in the sequential pipeline, never Linear by Linear (the
        search's proxy and independent levels)."""
        return self.recover.steps > 0 or any(s.unit != "linear" for s in self.steps)

    def to_dict(self) -> dict:
        out = {"schedule": self.schedule, "float_dtype": self.float_dtype,
               "calibration": self.calibration.model_dump(),
               "steps": [{s.name: s.params()} for s in self.steps]}
        if self.recover.steps:  # absent when off, so recipes without it keep their hashes
            out["recover"] = self.recover.to_dict()
        if self.allow_growth:  # likewise
            out["allow_growth"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """A recipe from a mapping (what a recipe file holds). It must have at least one step: an empty recipe
        from a user is a mistake (``Recipe()`` itself, the identity, stays legal for code that means it)."""
        if data is None or data == {}:
            raise ValueError("the recipe is empty; allowed: a mapping with at least `steps`, e.g. steps: "
                             "[{gptq: {bits: 4, group_size: 128}}]")
        if not isinstance(data, dict):
            raise ValueError(f"a recipe must be a mapping, got {type(data).__name__} {shown(data)}")
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{shown(bad[0])}: unknown key; allowed keys: {sorted(cls.model_fields)}")
        recipe = cls(**data)
        if not recipe.steps:
            raise ValueError("steps: a recipe needs at least one step, e.g. steps: [{gptq: {bits: 4, group_size: "
                             f"128}}}}]; allowed techniques: {sorted(registry())}")
        return recipe

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        return cls.from_dict(parse_yaml(text, "recipe"))

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a .yaml/.yml/.json file (`core.yamlsafe.load_file`: JSON for .json, else YAML)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        return cls.from_dict(load_file(path, "recipe file"))

    def hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def __hash__(self) -> int:
        return hash(self.hash())

    # -- typing and costing --------------------------------------------------------------------
    def linear_specs(self, shapes: dict[str, tuple[int, int]] | dict[str, LinearSpec]) -> dict[str, LinearSpec]:
        """``{name: LinearSpec}``: a shape ``(out_features, in_features)`` is a dense Linear in `float_dtype`."""
        return {name: s if isinstance(s, LinearSpec) else LinearSpec.dense(*s, dtype=self.float_dtype)
                for name, s in shapes.items()}

    def walk(self, shapes: dict[str, tuple[int, int]] | dict[str, LinearSpec]) -> Iterator["StepWalk"]:
        """Plan every step on every Linear it targets, without weights: one `StepWalk` per step.

        Raises ``IllegalStep`` naming the step, the Linear and the reason where a step cannot apply (the
        hard rules), and, once the last step is walked, where `recover` would find nothing to train.
        `check` (the costing) and ``rules.explain`` are both this walk.
        """
        specs = self.linear_specs(shapes)
        touched = set()
        for i, step in enumerate(self.steps):
            if step.unit == "model" and any(s.unit != "model" for s in self.steps[:i]):
                first = next(s for s in self.steps[:i] if s.unit != "model")
                raise IllegalStep(f"steps[{i}].{step.name} transforms the whole model, so it must come before "
                                  f"every step that compresses (it follows {first.name}); masks, factors and "
                                  "grids are then chosen in the transformed basis")
            if step.unit == "block" and self.schedule != "layer-major":
                raise IllegalStep(f"steps[{i}].{step.name} reproduces each dense block after that block's steps, "
                                  "so it needs schedule: layer-major")
            names = [n for n in specs if step.targets(n)]
            if not names:
                raise IllegalStep(f"steps[{i}].{step.name}: include={list(step.include)} "
                                  f"exclude={list(step.exclude)} select no Linear")
            before = {n: specs[n] for n in names}
            for n in names:
                try:
                    if step.needs_dense_input and (specs[n].kinds() != ("dense",) or specs[n].terms[0].a.quantized):
                        raise IllegalStep(f"{step.dense_input_reason}, so it must be the first step on a Linear "
                                          "(it got an already compressed one)")
                    specs[n] = step.plan_for(n, specs[n])
                except IllegalStep as err:
                    raise IllegalStep(f"steps[{i}].{step.name} on {n} ({specs[n].describe()}): {err}") from None
            touched.update(names)
            yield StepWalk(i, step, names, before, {n: specs[n] for n in names})
        if self.recover.steps and not any(self.recover.trainable(specs[n]) for n in touched):
            rec = self.recover
            leaves = {"lowrank": "an unquantized low-rank term", "sparse": "an unquantized sparse term",
                      "scales": "a quantized tensor"}
            what = "float tensor" if not rec.scales else "quantized tensor" if rec.parts == ("scales",) else "tensor"
            raise IllegalStep(f"recover: train={rec.train!r} finds no {what} to train: no step leaves "
                              + " or ".join(leaves[p] for p in rec.parts)
                              + (" (quantize, or drop recover)" if rec.parts == ("scales",) else
                                 " (quantize with target: sparse or dense, train: scales, or drop recover)"))

    def check(self, shapes: dict[str, tuple[int, int]] | dict[str, LinearSpec],
              other_bytes: int = 0) -> "CheckResult":
        """Walk every step over every targeted Linear (`walk`); raise ``IllegalStep`` naming the step and reason.

        Args:
            shapes: ``{linear name: (out_features, in_features)}`` (or a LinearSpec) of the Linears
                inside decoder blocks, e.g. from ``lmcompose.models.load.model_linear_shapes``.
            other_bytes: bytes of everything else the saved model holds (embeddings, norms, head).
        """
        specs = self.linear_specs(shapes)
        dense = {n: s.dense_fp16_nbytes() for n, s in specs.items()}
        before = uncompressed_bytes(specs)
        touched = set()
        for walked in self.walk(specs):
            specs.update(walked.after)
            touched.update(walked.names)
        result = CheckResult(specs, dense, sorted(touched), other_bytes)
        self.refuse_growth(result, before)
        return result

    def refuse_growth(self, result: "CheckResult", before: dict[str, int]) -> None:
        """Raise ``IllegalStep`` when the compressed Linears of `result` take more bytes than they did uncompressed
        (`before`, from `uncompressed_bytes` of the specs before the walk), unless the recipe says
        ``allow_growth: true``. `check` and ``lmcompose.rules.explain`` both end here."""
        uncompressed = sum(before[n] for n in result.compressed)
        if not self.allow_growth and result.linear_bytes > uncompressed:
            raise IllegalStep(f"the recipe stores {result.linear_bytes:,} bytes for the {len(result.compressed)} "
                              f"Linears it compresses, more than the {uncompressed:,} bytes they take uncompressed "
                              f"(dense in {self.float_dtype}; {result.bits_per_weight:.2f} bits per weight); "
                              "compress more (fewer bits, larger groups, a lower rank) or set allow_growth: true")


def uncompressed_bytes(specs: dict[str, LinearSpec]) -> dict[str, int]:
    """Bytes of each Linear before any step: dense fp16, or the recipe's float_dtype where that is wider."""
    return {n: max(s.dense_fp16_nbytes(), s.nbytes()) for n, s in specs.items()}


@dataclass
class StepWalk:
    """One step of `Recipe.walk`: the Linears it targets, in model order, and their specs before and after."""

    index: int
    step: Technique
    names: list[str]
    before: dict[str, LinearSpec]
    after: dict[str, LinearSpec]


@dataclass
class CheckResult:
    specs: dict[str, LinearSpec]
    dense_fp16: dict[str, int]
    compressed: list[str] = field(default_factory=list)
    other_bytes: int = 0

    @property
    def linear_bytes(self) -> int:
        return sum(self.specs[n].nbytes() for n in self.compressed)

    @property
    def linear_dense_bytes(self) -> int:
        return sum(self.dense_fp16[n] for n in self.compressed)

    @property
    def bits_per_weight(self) -> float:
        weights = sum(self.specs[n].out_features * self.specs[n].in_features for n in self.compressed)
        return 8 * self.linear_bytes / weights if weights else 16.0

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole saved model: every block Linear as planned, plus everything else."""
        return sum(s.nbytes() for s in self.specs.values()) + self.other_bytes

    def to_dict(self) -> dict:
        return {"compressed_linears": len(self.compressed), "linear_bytes": self.linear_bytes,
                "linear_dense_fp16_bytes": self.linear_dense_bytes,
                "ratio": self.linear_bytes / self.linear_dense_bytes if self.linear_dense_bytes else 1.0,
                "bits_per_weight": self.bits_per_weight, "total_bytes": self.total_bytes}
