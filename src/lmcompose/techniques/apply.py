"""The one engine that runs steps on a Linear: apply → invariant check → layer error → record.

The pipeline (`pipeline.sequential`), the search proxy (`search.objective`) and the sensitivity
allocation (`techniques.allocation`) all apply steps through `apply_steps`, so a step that breaks an
invariant fails with the same `InvariantError` wherever it runs, and a layer error is measured the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..algebra.invariants import check_step
from ..core.stats import Stats, relative_error
from ..runtime.linear import CompressedLinear


@dataclass
class StepResult:
    """One step on one Linear: its native knobs, the layer's error after it, its seconds, the layer it made."""

    technique: str
    info: dict
    rel_error: float
    seconds: float
    layer: CompressedLinear = field(repr=False)


def apply_steps(layer: CompressedLinear, steps, stats: Stats, name: str = "",
                original: torch.Tensor | None = None) -> tuple[CompressedLinear, list[StepResult]]:
    """Apply `steps` in order to `layer` with its input statistics `stats`.

    Each step's output is checked by `check_step` (raising `InvariantError`, naming `name`) before the
    next step runs; its relative output error ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` (H = ``stats.gram``) is taken
    against `original`, by default the dense weight of `layer` before the first step. Returns the final
    layer and one `StepResult` per step."""
    if original is None:
        original = layer.to_dense(torch.float32)
    results = []
    for step in steps:
        t0 = time.perf_counter()
        new, info = step.apply(layer, stats)
        seconds = time.perf_counter() - t0
        check_step(layer, new, step, name)
        err = relative_error(original, new.to_dense(torch.float32), stats.gram)
        results.append(StepResult(step.name, info, err, seconds, new))
        layer = new
    return layer, results
