"""The one sequential loop (DESIGN §1): capture block inputs once, then per block observe → apply →
propagate. It knows no technique by name: it asks each step which Linears it targets, hands each one
its input statistics, and records what came back.

Schedules: ``layer-major`` runs every step on block i before block i+1; ``step-major`` runs one step
over the whole model (its own sequential pass) before the next.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..core import dtypes as compute
from ..runtime.linear import CompressedLinear
from ..techniques.apply import apply_steps
from .blocks import block_linears, find_blocks, set_module
from .dense_stats import DenseStats
from .passes import BlockInputs, capture_inputs, observe, run_block
from .records import LayerRecord

log = logging.getLogger(__name__)


class SequentialCompressor:
    """Runs a recipe's steps over a model block by block. Created per ``compress()`` call."""

    def __init__(self, model: nn.Module, steps, float_dtype: str = "fp16", device=None, on_block=None,
                 compute_dtype: str = "fp32"):
        self.model = model
        self.compute_dtype = compute_dtype  # resolved (not "auto"): block forwards run under its autocast
        self.steps = steps
        self.float_dtype = float_dtype
        self.device = device
        self.on_block = on_block
        self.prefix, self.blocks = find_blocks(model)
        self.records: dict[str, LayerRecord] = {}
        self.block_seconds: list[float] = []
        self.allocated: dict[int, dict[str, object]] = {}  # id(step) -> {linear name: allocated copy}

    def _forwards(self, device):
        """Block forwards in the compute dtype; techniques and errors never run under it."""
        return compute.autocast(self.compute_dtype, device)

    def _compress_group(self, step, names: list[str], stats: dict):
        allocated = self.allocated.get(id(step), {})  # per-Linear copies of an allocating step
        for name in names:
            if name not in stats:
                self.records.setdefault(name, LayerRecord.left_unchanged(name, "never called in calibration"))
                log.warning("%s received no calibration input; left unchanged", name)
                continue
            layer = self.model.get_submodule(name)
            if not isinstance(layer, CompressedLinear):
                layer = CompressedLinear.from_linear(layer, self.float_dtype)
            record = self.records.setdefault(name, LayerRecord.start(name, layer))
            new, (result,) = apply_steps(layer, [allocated.get(name, step)], stats[name], name, record.original)
            record.add_step(result)
            set_module(self.model, name, new)
            log.info("%s %s: rel. error %.3e, %.2f bits/weight", name, step.name, result.rel_error,
                     new.spec().bits_per_weight())

    @torch.no_grad()
    def _prepass(self, inputs: BlockInputs, device) -> dict[int, dict]:
        """The dense statistics pass (`DenseStats.from_inputs`, the search's) for the steps that allocate
        their budget across Linears (OWL, sensitivity). Returns ``{id(step): {linear name: its copy of the
        step}}``; one extra observe + forward per block."""
        needing = [s for s in self.steps if s.needs_prepass]
        if not needing:
            return {}
        dense = DenseStats.from_inputs(self.model, inputs, device, self.compute_dtype)
        return {id(s): s.allocate(dense.allocation_input(s, self.model, device), float_dtype=self.float_dtype)
                for s in needing}

    def _block(self, index: int, inputs: BlockInputs, steps, device):
        block = self.blocks[index]
        prefix = f"{self.prefix}.{index}"
        for step in steps:
            targets = {n: m for n, m in block_linears(block, prefix).items() if step.targets(n)}
            if not targets:
                continue
            with self._forwards(device):
                stats, groups = observe(block, inputs, index, targets)
            if not step.true_sequential:
                self._compress_group(step, list(targets), stats)
                continue
            for g, group in enumerate(groups):
                if g > 0:  # inputs of this group changed when the previous groups were compressed
                    current = {n: m for n, m in block_linears(block, prefix).items() if n in group}
                    with self._forwards(device):
                        stats, _ = observe(block, inputs, index, current)
                self._compress_group(step, group, stats)

    @torch.no_grad()
    def run(self, windows: torch.Tensor, batch_size: int, schedule: str = "layer-major") -> None:
        if schedule not in ("layer-major", "step-major"):
            raise ValueError(f"schedule={schedule!r} is not allowed; allowed: 'layer-major', 'step-major'")
        home = next(self.model.parameters()).device
        device = torch.device(self.device) if self.device is not None else home
        with self._forwards(home):
            inputs = capture_inputs(self.model, windows, batch_size, home)
        if device != home:  # blocks visit `device` one at a time; the rest of the model stays home
            inputs = inputs.to(device)
        self.allocated = self._prepass(inputs, device)
        passes = [self.steps] if schedule == "layer-major" else [[s] for s in self.steps]
        n = len(self.blocks)
        self.block_seconds = [0.0] * n
        for p, steps in enumerate(passes):
            current = inputs.copy()
            for i in range(n):
                t0 = time.perf_counter()
                self.blocks[i].to(device)
                self._block(i, current, steps, device)
                with self._forwards(device):
                    current.hidden = run_block(self.blocks[i], current, i)
                self.blocks[i].to(home)
                if p == len(passes) - 1:  # the block is final: its original weights are not needed
                    for name, record in self.records.items():
                        if name.startswith(f"{self.prefix}.{i}."):
                            record.original = None
                self.block_seconds[i] += time.perf_counter() - t0
                if self.on_block:
                    self.on_block(p * n + i + 1, len(passes) * n)
