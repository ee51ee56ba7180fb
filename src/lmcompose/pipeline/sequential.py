"""The one sequential loop (DESIGN §1): capture block inputs once, then per block observe → apply →
propagate. It knows no technique by name: it asks each step which Linears it targets, hands each one
its input statistics, and records what came back.

A recipe of statistic-free steps without calibration (``calibration: {source: none}``) skips all of it:
each block is loaded, its Linears compressed and released, with no forward.

Schedules: ``layer-major`` runs every step on block i before block i+1; ``step-major`` runs one step
over the whole model (its own sequential pass) before the next.

Two optional collaborators, each told about block boundaries only: a `journal`
(`pipeline.resume.RunJournal`) records every final block so that a killed run can resume, and a
`block_io` (e.g. `models.stream.StreamedBlocks`) materialises a block's weights just before it is visited
(``load(index, block, prefix)``) and frees them once the block is final (``release(index, block)``), so
that only one block's weights are in memory at a time.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..core import dtypes as compute
from ..core.memory import release_freed_memory
from ..runtime.linear import CompressedLinear
from ..algebra.terms import Dense
from ..techniques.apply import (BlockContext, GroupContext, apply_block_step, apply_group_step, apply_stacked,
                                apply_steps)
from .blocks import block_linears, find_blocks, set_module
from .dense_stats import DenseStats
from .model_context import ModelContext
from .passes import BlockInputs, advance, capture_inputs, observe, run_block
from .records import LayerRecord
from .structure import norm_weight, set_norm_weight, trace_block

log = logging.getLogger(__name__)


class SequentialCompressor:
    """Runs a recipe's steps over a model block by block. Created per ``compress()`` call."""

    def __init__(self, model: nn.Module, steps, float_dtype: str = "fp16", device=None, on_block=None,
                 compute_dtype: str = "fp32", journal=None, block_io=None):
        self.model = model
        self.journal = journal  # pipeline.resume.RunJournal, or None
        self.block_io = block_io  # loads / frees each block's weights around its visit, or None
        self.compute_dtype = compute_dtype  # resolved (not "auto"): block forwards run under its autocast
        self.steps = steps
        self.float_dtype = float_dtype
        self.device = device
        self.on_block = on_block
        self.prefix, self.blocks = find_blocks(model)
        self.records: dict[str, LayerRecord] = {}
        self.block_seconds: list[float] = []
        self.allocated: dict[int, dict[str, object]] = {}  # id(step) -> {linear name: allocated copy}
        self.model_steps: list[dict] = []  # records of the steps that transformed the whole model
        self._structure: dict[int, object] = {}  # block index -> BlockStructure (traced when a step needs it)
        self._dense_targets: dict[str, list] = {}  # for block steps: the dense block's outputs, per input kind

    def _forwards(self, device):
        """Block forwards in the compute dtype; techniques and errors never run under it."""
        return compute.autocast(self.compute_dtype, device)

    def _compress_group(self, step, names: list[str], stats: dict, shared: list[list[str]] = ()):
        """Apply `step` to each of `names`; the Linears of one list in `shared` read the same input and
        are solved as one stacked matrix where the step allows it (`apply_stacked`)."""
        allocated = self.allocated.get(id(step), {})  # per-Linear copies of an allocating step
        done = set()
        for name in names:
            if name in done:
                continue
            group = next((g for g in shared if name in g), [])
            group = [n for n in group if n in names and n in stats and n not in allocated]
            if len(group) > 1:
                layers = {n: self._compressed(n) for n in group}
                for n in group:
                    self.records.setdefault(n, LayerRecord.start(n, layers[n]))
                results = apply_stacked(step, layers, stats[name], {n: self.records[n].original for n in group})
                if results is not None:
                    for n, result in results.items():
                        self.records[n].add_step(result)
                        set_module(self.model, n, result.layer)
                        log.info("%s %s (stacked): rel. error %.3e, %.2f bits/weight", n, step.name,
                                 result.rel_error, result.layer.spec().bits_per_weight())
                    done.update(group)
                    continue
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

    def _compressed(self, name: str):
        layer = self.model.get_submodule(name)
        return layer if isinstance(layer, CompressedLinear) else CompressedLinear.from_linear(layer, self.float_dtype)

    def _record(self, name: str, layer, result) -> None:
        record = self.records[name]
        record.add_step(result)
        if result.input_scale is not None:  # the Linear now reads x ⊙ d: its original, on that input, is W/d
            record.original = record.original / result.input_scale.to(record.original).unsqueeze(0)
        set_module(self.model, name, layer)

    def _fold(self, index: int, inputs: BlockInputs, group: list[str], device) -> GroupContext:
        """How the shared input of `group` (full names) can be scaled exactly: through the residual-reading
        norm that feeds exactly this group, or the Linear whose output channels it reads one to one."""
        block, prefix = self.blocks[index], f"{self.prefix}.{index}."
        if index not in self._structure:
            with self._forwards(device):
                self._structure[index] = trace_block(block, inputs, index)
        s = self._structure[index]
        rel = [n.removeprefix(prefix) for n in group]
        producer = s.producer.get(rel[0])
        if producer in s.readers and sorted(s.readers[producer]) == sorted(rel):
            norm = block.get_submodule(producer)

            def fold_norm(d: torch.Tensor) -> bool:
                set_norm_weight(norm, norm_weight(norm) * d.to(norm_weight(norm)))
                return True
            return GroupContext(group, producer, "norm", fold_norm, self.float_dtype)
        source = s.channel_source.get(rel[0]) if len(rel) == 1 else None
        if source is not None:
            full = prefix + source

            def fold_linear(d: torch.Tensor) -> bool:
                layer = self.model.get_submodule(full)
                if isinstance(layer, nn.Linear):
                    layer.weight.data.mul_(d.to(layer.weight).unsqueeze(1))
                    if layer.bias is not None:
                        layer.bias.data.mul_(d.to(layer.bias))
                elif (len(layer.terms) == 1 and isinstance(layer.terms[0], Dense)
                      and isinstance(layer.terms[0].a, torch.Tensor)):
                    a = layer.terms[0].a
                    bias = layer.bias_value
                    new = layer.with_terms([Dense((a.float() * d.to(a.device).unsqueeze(1)).to(a.dtype))])
                    if bias is not None:
                        new.bias_value = (bias.float() * d.to(bias.device)).to(bias.dtype)
                    set_module(self.model, full, new)
                else:
                    return False  # already compressed: scaling its rows would move codes
                if full in self.records and self.records[full].original is not None:
                    rec = self.records[full]
                    rec.original = rec.original * d.to(rec.original).unsqueeze(1)
                return True
            return GroupContext(group, source, "linear", fold_linear, self.float_dtype)
        return GroupContext(group, None, None, lambda d: False, self.float_dtype)

    def _group_step(self, step, index: int, inputs: BlockInputs, group: list[str], stats: dict, device):
        names = [n for n in group if n in stats]
        if not names:
            return
        layers = {n: self._compressed(n) for n in names}
        for n in names:
            self.records.setdefault(n, LayerRecord.start(n, layers[n]))
        context = self._fold(index, inputs, names, device)
        results = apply_group_step(step, layers, stats[names[0]], context,
                                   {n: self.records[n].original for n in names})
        for n, result in results.items():
            self._record(n, result.layer, result)

    def _block_step(self, step, index: int, inputs: BlockInputs, targets: dict, device):
        names = list(targets)
        with self._forwards(device):
            stats, _ = observe(self.blocks[index], inputs, index, targets)
        layers = {n: self._compressed(n) for n in names if n in stats}
        for n, layer in layers.items():
            self.records.setdefault(n, LayerRecord.start(n, layer))
        wanted = getattr(step, "target_input", "compressed")
        context = BlockContext(self.blocks[index], index, f"{self.prefix}.{index}", list(layers), inputs,
                               self._dense_targets.get(wanted), stats,
                               {n: self.records[n].original for n in layers}, self.compute_dtype, device,
                               self.float_dtype)
        for n, layer in layers.items():  # the step trains the modules in place of the block
            set_module(self.model, n, layer)
        results = apply_block_step(step, context, layers)
        for n, result in results.items():
            self._record(n, result.layer, result)

    def _block(self, index: int, inputs: BlockInputs, steps, device):
        block = self.blocks[index]
        prefix = f"{self.prefix}.{index}"
        for step in steps:
            targets = {n: m for n, m in block_linears(block, prefix).items() if step.targets(n)}
            if not targets:
                continue
            if step.unit == "block":
                self._block_step(step, index, inputs, targets, device)
                continue
            with self._forwards(device):
                stats, groups = observe(block, inputs, index, targets)
            if step.unit == "group":
                for group in groups:
                    self._group_step(step, index, inputs, group, stats, device)
                continue
            if not step.true_sequential:
                self._compress_group(step, list(targets), stats, groups)
                continue
            for g, group in enumerate(groups):
                if g > 0:  # inputs of this group changed when the previous groups were compressed
                    current = {n: m for n, m in block_linears(block, prefix).items() if n in group}
                    with self._forwards(device):
                        stats, _ = observe(block, inputs, index, current)
                self._compress_group(step, group, stats, [group])

    def _restore(self, current: BlockInputs | None, dense_stream: BlockInputs | None, device) -> int:
        """Put back the blocks an interrupted run finished (`journal`), and the hidden states entering the
        next one (none without calibration: `current` None); returns how many blocks are done."""
        done = self.journal.done
        for i in range(done):
            records, seconds = self.journal.restore_block(i, self.model, self.blocks[i], f"{self.prefix}.{i}")
            self.records.update(records)
            self.block_seconds[i] = seconds
            if self.block_io is not None:
                self.block_io.release(i, self.blocks[i])
        if done and current is not None:
            current.hidden, dense = self.journal.hidden(device)
            if dense_stream is not None:
                dense_stream.hidden = dense
        if done and self.on_block:
            self.on_block(done, len(self.blocks))
        return done

    def _visit(self, index: int, device) -> None:
        if self.block_io is not None:
            self.block_io.load(index, self.blocks[index], f"{self.prefix}.{index}")
        self.blocks[index].to(device)

    def _leave(self, index: int, home, final: bool, hidden: list, dense: list | None, t0: float) -> None:
        """Block `index` is done for this pass: back `home`, and if `final` (the last pass) its originals
        are dropped, it is journaled with the `hidden` states entering the next block (and the `dense`
        stream's) and its weights are released."""
        block = self.blocks[index]
        for module in block.modules():  # the floats quantize steps kept for block steps
            if isinstance(module, CompressedLinear):
                module.forget_sources()
        block.to(home)
        prefix = f"{self.prefix}.{index}"
        if final:  # the block is final: its original weights are not needed
            for name, record in self.records.items():
                if name.startswith(prefix + "."):
                    record.original = None
        self.block_seconds[index] += time.perf_counter() - t0
        if self.journal is not None and final:
            self.journal.block_done(index, block, prefix, self.records, self.block_seconds[index], hidden, dense)
        if self.block_io is not None and final:
            self.block_io.release(index, block)
        release_freed_memory()  # the block's temporaries, so that glibc's heap does not grow block by block

    def _run_without_calibration(self, device, home) -> None:
        """The pass of a recipe whose steps read the weights alone (``calibration: {source: none}``, checked by
        the recipe): no calibration forward at all; each block is loaded, its Linears compressed step by step
        (each step's error measured on the weights, `apply_steps`) and released."""
        n = len(self.blocks)
        self.block_seconds = [0.0] * n
        first = self._restore(None, None, device) if self.journal is not None else 0
        for i in range(first, n):
            t0 = time.perf_counter()
            self._visit(i, device)
            linears = block_linears(self.blocks[i], f"{self.prefix}.{i}")
            for step in self.steps:
                names = [name for name in linears if step.targets(name)]
                self._compress_group(step, names, dict.fromkeys(names))
            self._leave(i, home, True, [], None, t0)
            if self.on_block:
                self.on_block(i + 1, n)

    @torch.no_grad()
    def run(self, windows: torch.Tensor | None, batch_size: int, schedule: str = "layer-major") -> None:
        """Run the steps over every block, calibrating on `windows` ([n, seqlen] token ids). `windows` None
        runs a recipe of statistic-free steps without any calibration forward (`_run_without_calibration`)."""
        if schedule not in ("layer-major", "step-major"):
            raise ValueError(f"schedule={schedule!r} is not allowed; allowed: 'layer-major', 'step-major'")
        home = next(self.model.parameters()).device
        device = torch.device(self.device) if self.device is not None else home
        if windows is None:  # no statistics flow between blocks, so both schedules give the same tensors
            needing = [s.name for s in self.steps if s.uses_statistics or s.unit != "linear"]
            if needing:
                raise ValueError(f"without calibration windows only statistic-free Linear steps run; got {needing}")
            return self._run_without_calibration(device, home)
        for step in [s for s in self.steps if s.unit == "model"]:  # leading steps (Recipe.walk checks it)
            context = ModelContext(self.model, self.float_dtype, self.compute_dtype)
            self.model_steps.append({"technique": step.name, **step.transform_model(self.model, context)})
        self.steps = [s for s in self.steps if s.unit != "model"]
        with self._forwards(home):
            inputs = capture_inputs(self.model, windows, batch_size, home)
        if device != home:  # blocks visit `device` one at a time; the rest of the model stays home
            inputs = inputs.to(device)
        self.allocated = self._prepass(inputs, device)
        passes = [self.steps] if schedule == "layer-major" else [[s] for s in self.steps]
        n = len(self.blocks)
        self.block_seconds = [0.0] * n
        wants = {getattr(s, "target_input", "compressed") for s in self.steps if s.unit == "block"}
        dense_stream = inputs.copy() if "dense" in wants else None
        for p, steps in enumerate(passes):
            current = inputs.copy()
            if p == len(passes) - 1:  # block 0's inputs are not needed again: let the pass free them
                inputs.hidden = []
            first = self._restore(current, dense_stream, device) if self.journal is not None else 0
            for i in range(first, n):
                t0 = time.perf_counter()
                self._visit(i, device)
                if wants:  # the dense block's outputs, before its steps run (layer-major: Recipe.walk checks it)
                    with self._forwards(device):
                        if "compressed" in wants:
                            self._dense_targets["compressed"] = run_block(self.blocks[i], current, i)
                        if dense_stream is not None:
                            dense_stream.hidden = self._dense_targets["dense"] = run_block(
                                self.blocks[i], dense_stream, i)
                self._block(i, current, steps, device)
                with self._forwards(device):
                    advance(self.blocks[i], current, i)
                self._leave(i, home, p == len(passes) - 1, current.hidden,
                            None if dense_stream is None else dense_stream.hidden, t0)
                if self.on_block:
                    self.on_block(p * n + i + 1, len(passes) * n)
