"""Report: what a compression run did, as data. The CLI renders it; the library never prints."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class LayerRecord:
    """One Linear: its shape, each step applied (native knobs, error after it, seconds), final bytes."""

    name: str
    shape: tuple[int, int] = (0, 0)
    steps: list[dict] = field(default_factory=list)
    nbytes: int = 0
    dense_fp16_bytes: int = 0
    structure: str = ""
    skipped: str | None = None
    original: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def start(cls, name: str, layer) -> "LayerRecord":
        spec = layer.spec()
        return cls(name, (layer.out_features, layer.in_features), [], spec.nbytes(), spec.dense_fp16_nbytes(),
                   spec.describe(), original=layer.to_dense(torch.float32).cpu())

    @classmethod
    def left_unchanged(cls, name: str, reason: str) -> "LayerRecord":
        return cls(name, skipped=reason)

    def add_step(self, result) -> None:
        """Record one step's `techniques.apply.StepResult`; the bytes and structure become its layer's."""
        spec = result.layer.spec()
        self.steps.append({"technique": result.technique, **result.info, "rel_error": result.rel_error,
                           "seconds": result.seconds})
        self.nbytes, self.structure = spec.nbytes(), spec.describe()

    @property
    def rel_error(self) -> float | None:
        return self.steps[-1]["rel_error"] if self.steps else None

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1]) if self.shape[0] else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("original")
        d["shape"] = list(self.shape)
        d["rel_error"], d["bits_per_weight"] = self.rel_error, self.bits_per_weight
        return d


@dataclass
class Report:
    model: str
    recipe: dict
    recipe_hash: str
    layers: list[LayerRecord]
    block_seconds: list[float]
    wall_seconds: float
    peak_rss_bytes: int
    linear_bytes: int
    linear_dense_fp16_bytes: int
    linear_weights: int
    total_bytes: int
    calibration: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    recovery: dict | None = None  # the recipe's LM-loss recovery: settings, losses, seconds
    transforms: list[dict] = field(default_factory=list)  # steps that transformed the whole model first

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.linear_bytes / self.linear_weights if self.linear_weights else 0.0

    @property
    def ratio(self) -> float:
        return self.linear_bytes / self.linear_dense_fp16_bytes if self.linear_dense_fp16_bytes else 1.0

    def summary(self) -> dict:
        errs = [l.rel_error for l in self.layers if l.rel_error is not None]
        return {"model": self.model, "recipe_hash": self.recipe_hash,
                "compressed_linears": sum(1 for l in self.layers if l.steps),
                "bits_per_weight": round(self.bits_per_weight, 4), "ratio_of_fp16": round(self.ratio, 4),
                "linear_bytes": self.linear_bytes, "total_bytes": self.total_bytes,
                "mean_rel_error": sum(errs) / len(errs) if errs else None,
                "wall_seconds": round(self.wall_seconds, 2),
                "seconds_per_block": round(sum(self.block_seconds) / max(len(self.block_seconds), 1), 3),
                "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1)}

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "model": self.model, "recipe": self.recipe,
                "recipe_hash": self.recipe_hash, "calibration": self.calibration,
                "evaluation": self.evaluation, "environment": self.environment,
                "block_seconds": self.block_seconds, "wall_seconds": self.wall_seconds,
                "peak_rss_bytes": self.peak_rss_bytes, "linear_bytes": self.linear_bytes,
                "linear_dense_fp16_bytes": self.linear_dense_fp16_bytes, "linear_weights": self.linear_weights,
                "total_bytes": self.total_bytes, "recovery": self.recovery, "transforms": self.transforms,
                "layers": [l.to_dict() for l in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)
