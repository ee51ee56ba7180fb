"""The one sequential loop (DESIGN §1): capture block inputs once, then per block observe → apply →
propagate. It knows no technique by name: it asks each step which Linears it targets, hands each one
its input statistics, and records what came back.

Schedules: ``layer-major`` runs every step on block i before block i+1; ``step-major`` runs one step
over the whole model (its own sequential pass) before the next.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..algebra.invariants import check_step
from ..core import dtypes as compute
from ..core.stats import StatsAccumulator, relative_error
from ..runtime.linear import CompressedLinear
from .blocks import block_linears, find_blocks, set_module
from .hooks import owned_hooks
from .records import LayerRecord

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockInputs:
    """Per calibration batch: the hidden states entering the current block, and each block's kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict]]  # [batch][block] -> keyword arguments the model passed that block
    args: list[list[tuple]] = field(default_factory=list)  # positional extras after hidden_states


@torch.no_grad()
def capture_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device) -> BlockInputs:
    """Run the model's embedding and mask code once per batch, with every block replaced by the
    identity, recording what each block would receive. Block-specific kwargs (sliding-window vs full
    attention masks, local vs global rotary tables) are therefore captured per block."""
    _, blocks = find_blocks(model)
    hidden, kwargs, args = [], [], []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start:start + batch_size].to(device)
        rec_kw, rec_args = [None] * len(blocks), [None] * len(blocks)
        first = []
        for as_tuple in (False, True):
            with owned_hooks() as hooks:
                for i, block in enumerate(blocks):
                    def pre(module, a, kw, i=i):
                        h = a[0] if a else kw["hidden_states"]
                        if i == 0:
                            first[:] = [h]
                        kw = {k: v for k, v in kw.items() if k not in ("hidden_states", "past_key_values",
                                                                         "past_key_value")}
                        kw["use_cache"] = False
                        rec_kw[i], rec_args[i] = kw, tuple(a[1:])
                        if i == len(blocks) - 1:
                            raise _StopForward

                    hooks.forward_pre(block, pre, with_kwargs=True)
                    ident = (lambda h=None, *a, **k: (h if h is not None else k["hidden_states"],)) if as_tuple \
                        else (lambda h=None, *a, **k: h if h is not None else k["hidden_states"])
                    hooks.patch(block, "forward", ident)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    break
                except (TypeError, IndexError, ValueError, RuntimeError, AttributeError):
                    # The model indexes its blocks' outputs (older transformers return tuples): retry with
                    # identity blocks that return a tuple; a second failure is a real error.
                    if as_tuple:
                        raise
        hidden.append(first[0])
        kwargs.append(rec_kw)
        args.append(rec_args)
    return BlockInputs(hidden, kwargs, args)


def _weight(module: nn.Module) -> torch.Tensor:
    return module.to_dense(torch.float32) if isinstance(module, CompressedLinear) else module.weight.float()


def run_block(block: nn.Module, inputs: BlockInputs, index: int) -> list[torch.Tensor]:
    return [_hidden(block(h, *inputs.args[b][index], **inputs.kwargs[b][index]))
            for b, h in enumerate(inputs.hidden)]


@torch.no_grad()
def observe(block: nn.Module, inputs: BlockInputs, index: int, linears: dict[str, nn.Module]):
    """Forward all batches through `block` with hooks on `linears`.

    Returns ``(stats, groups)``: stats per Linear name (Linears fed the same tensor, such as q/k/v,
    share one accumulator), and the groups of Linears in execution order, one group per distinct input.
    """
    accs, alias, order = {}, {}, []
    seen = {}  # id(input) -> (input, canonical name); holding the tensor keeps its id unique

    def hook(name):
        def fn(module, a):
            x = a[0]
            hit = seen.get(id(x))
            canonical = hit[1] if hit is not None else name
            if alias.setdefault(name, canonical) != canonical:
                raise RuntimeError(f"{name} shares its input with {canonical} in one batch but not in another")
            if hit is None:
                seen[id(x)] = (x, name)
                if name not in accs:
                    accs[name] = StatsAccumulator(x.shape[-1], device=x.device)
                    order.append(name)
                accs[name].update(x)
        return fn

    with owned_hooks() as hooks:
        for name, lin in linears.items():
            hooks.forward_pre(lin, hook(name))
        for b, h in enumerate(inputs.hidden):
            seen.clear()
            block(h, *inputs.args[b][index], **inputs.kwargs[b][index])
        seen.clear()
    stats = {name: accs[alias[name]].result() for name in linears if name in alias}
    groups = [[n for n in linears if alias.get(n) == c] for c in order]
    return stats, groups


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
            t0 = time.perf_counter()
            this = allocated.get(name, step)
            new, info = this.apply(layer, stats[name])
            seconds = time.perf_counter() - t0
            check_step(layer, new, this, name)
            err = relative_error(record.original, new.to_dense(torch.float32), stats[name].gram)
            record.add_step(this.name, info, err, seconds, new)
            set_module(self.model, name, new)
            log.info("%s %s: rel. error %.3e, %.2f bits/weight", name, step.name, err,
                     new.spec().bits_per_weight())

    @torch.no_grad()
    def _prepass(self, inputs: BlockInputs, device) -> dict[int, dict]:
        """Dense statistics of every block for the steps that allocate their budget across Linears (OWL,
        sensitivity). Returns ``{id(step): {linear name: its copy of the step}}``; one extra observe +
        forward per block."""
        needing = [s for s in self.steps if s.needs_prepass]
        if not needing:
            return {}
        home = next(self.model.parameters()).device
        seen: dict[int, list] = {id(s): [] for s in needing}
        current = BlockInputs(list(inputs.hidden), inputs.kwargs, inputs.args)
        for i, block in enumerate(self.blocks):
            block.to(device)
            linears = block_linears(block, f"{self.prefix}.{i}")
            with self._forwards(device):
                stats, _ = observe(block, current, i, linears)
            for s in needing:
                seen[id(s)].append([(n, _weight(m), stats[n]) for n, m in linears.items()
                                    if s.targets(n) and n in stats])
            with self._forwards(device):
                current.hidden = run_block(block, current, i)
            block.to(home)
        return {id(s): s.allocate(seen[id(s)]) for s in needing}

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
            inputs = BlockInputs(_to(inputs.hidden, device), _to(inputs.kwargs, device), _to(inputs.args, device))
        self.allocated = self._prepass(inputs, device)
        passes = [self.steps] if schedule == "layer-major" else [[s] for s in self.steps]
        n = len(self.blocks)
        self.block_seconds = [0.0] * n
        for p, steps in enumerate(passes):
            current = BlockInputs(list(inputs.hidden), inputs.kwargs, inputs.args)
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
