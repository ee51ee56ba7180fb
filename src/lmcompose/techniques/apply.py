"""The one engine that runs steps on a Linear: apply → invariant check → layer error → record.

The pipeline (`pipeline.sequential`), the search proxy (`search.objective`) and the sensitivity
allocation (`techniques.allocation`) all apply steps through `apply_steps`, so a step that breaks an
invariant fails with the same `InvariantError` wherever it runs, and a layer error is measured the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..algebra.invariants import check_step
from ..algebra.ops import input_stats
from ..core.stats import Stats, output_energy, relative_error
from ..runtime.linear import CompressedLinear


@dataclass
class StepResult:
    """One step on one Linear: its native knobs, the layer's error after it, its seconds, the layer it made."""

    technique: str
    info: dict
    rel_error: float
    seconds: float
    layer: CompressedLinear = field(repr=False)
    input_scale: torch.Tensor | None = field(default=None, repr=False)  # group steps that folded a scale


def apply_steps(layer: CompressedLinear, steps, stats: Stats | None, name: str = "",
                original: torch.Tensor | None = None) -> tuple[CompressedLinear, list[StepResult]]:
    """Apply `steps` in order to `layer` with its input statistics `stats`.

    Each step's output is checked by `check_step` (raising `InvariantError`, naming `name`) before the
    next step runs; its relative output error ``tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)`` (H = ``stats.gram``) is taken
    against `original`, by default the dense weight of `layer` before the first step. A layer with input
    operations hands the step the statistics of what its terms multiply (`algebra.ops.input_stats`).
    `stats` None (statistic-free steps run without calibration) measures the weights' own relative error
    ``‖ΔW‖²/‖W‖²`` instead. Returns the final layer and one `StepResult` per step."""
    if original is None:
        original = layer.to_dense(torch.float32)
    gram = None if stats is None else stats.gram  # None: statistic-free steps without calibration
    energy = output_energy(original, gram)
    results = []
    for step in steps:
        t0 = time.perf_counter()
        new, info = step.apply(layer, input_stats(stats, layer.input_ops) if layer.input_ops and stats else stats)
        seconds = time.perf_counter() - t0
        check_step(layer, new, step, name)
        err = relative_error(original, new.to_dense(torch.float32), gram, energy)
        results.append(StepResult(step.name, info, err, seconds, new))
        layer = new
    return layer, results


def apply_stacked(step, layers: dict[str, CompressedLinear], stats: Stats,
                  originals: dict[str, torch.Tensor | None]) -> dict[str, StepResult] | None:
    """One step on Linears that read the same input (`stats`), solved as one matrix of stacked rows
    (``step.apply_stacked``, e.g. GPTQ's q/k/v or gate/up in one sweep); then each layer is checked and
    measured as `apply_steps` does. Returns None, having changed nothing, when the step cannot stack
    these layers: the caller then applies it layer by layer."""
    stacked = getattr(step, "apply_stacked", None)
    if stacked is None or len(layers) < 2:
        return None
    t0 = time.perf_counter()
    made = stacked(list(layers.values()), stats)
    if made is None:
        return None
    seconds = (time.perf_counter() - t0) / len(made)
    out = {}
    for (name, layer), (new, info) in zip(layers.items(), made):
        check_step(layer, new, step, name)
        original = originals.get(name)
        if original is None:
            original = layer.to_dense(torch.float32)
        err = relative_error(original, new.to_dense(torch.float32), stats.gram)
        out[name] = StepResult(step.name, info, err, seconds, new)
    return out


@dataclass
class GroupResult:
    """What a group step made of one Linear. `input_scale` is d when the step folded a per-channel scale
    into the producer of the group's input, so that the Linear now reads ``x ⊙ d``: its new weight then
    equals the old one times diag(1/d) before any rounding."""

    layer: CompressedLinear
    info: dict
    input_scale: torch.Tensor | None = None


@dataclass
class GroupContext:
    """Where a group's shared input comes from, and how to scale it: ``fold(d)`` multiplies the input's
    channels by ``d`` exactly, by editing its producer (a norm's weight, or a preceding Linear's rows),
    and returns False (changing nothing) when the structure does not allow it."""

    names: list[str]
    producer: str | None = None
    producer_kind: str | None = None   # "norm", "linear" or None
    fold: Callable[[torch.Tensor], bool] = lambda d: False
    float_dtype: str = "fp16"


@dataclass
class BlockContext:
    """One decoder block for a block step: its Linears (full names), the inputs the compressed model
    feeds it, and the outputs of the dense block it should reproduce (on the inputs its `target_input`
    asks for, dense or compressed)."""

    block: nn.Module
    index: int
    prefix: str
    names: list[str]
    inputs: object                       # pipeline.passes.BlockInputs
    targets: list[torch.Tensor] | None   # per batch: the dense block's output
    stats: dict                          # Linear name -> Stats of its current input
    originals: dict                      # Linear name -> dense weight (fp32) in the current input basis
    compute_dtype: str = "fp32"
    device: object = None
    float_dtype: str = "fp16"


def _rescaled(w: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
    """The effective weight of a layer reading x ⊙ d, expressed on x: W · diag(d)."""
    return w if d is None else w * d.to(w.device, w.dtype).unsqueeze(0)


def apply_group_step(step, layers: dict[str, CompressedLinear], stats: Stats, context: GroupContext,
                     originals: dict[str, torch.Tensor]) -> dict[str, StepResult]:
    """Run a group step (unit "group") on Linears sharing one input, then check and measure each like
    `apply_steps`: the invariant check, and the error against its original weight on the old input basis."""
    t0 = time.perf_counter()
    made = step.apply_group(layers, stats, context)
    seconds = (time.perf_counter() - t0) / max(len(made), 1)
    out = {}
    for name, res in made.items():
        check_step(layers[name], res.layer, step, name)
        err = relative_error(originals[name], _rescaled(res.layer.to_dense(torch.float32), res.input_scale),
                             stats.gram)
        out[name] = StepResult(step.name, res.info, err, seconds, res.layer, res.input_scale)
    return out


def apply_block_step(step, context: BlockContext, layers: dict[str, CompressedLinear]) -> dict[str, StepResult]:
    """Run a block step (unit "block"), then check and measure each Linear it returns like `apply_steps`."""
    t0 = time.perf_counter()
    made = step.apply_block(context)
    seconds = (time.perf_counter() - t0) / max(len(made), 1)
    out = {}
    for name, (layer, info) in made.items():
        check_step(layers[name], layer, step, name)
        err = relative_error(context.originals[name], layer.to_dense(torch.float32), context.stats[name].gram)
        out[name] = StepResult(step.name, info, err, seconds, layer)
    return out
