"""Forward passes over the decoder blocks on calibration windows: capture what each block receives,
observe the input statistics of a block's Linears, run a block. The sequential loop
(`pipeline.sequential`) and the dense statistics pass (`pipeline.dense_stats`) are built from these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.stats import StatsAccumulator
from .blocks import find_blocks
from .hooks import owned_hooks


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

    def to(self, device) -> "BlockInputs":
        return BlockInputs(_to(self.hidden, device), _to(self.kwargs, device), _to(self.args, device))

    def copy(self) -> "BlockInputs":
        """A copy whose hidden states a pass may replace block by block, leaving these ones as they are."""
        return BlockInputs(list(self.hidden), self.kwargs, self.args)


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


def run_block(block: nn.Module, inputs: BlockInputs, index: int) -> list[torch.Tensor]:
    return [_hidden(block(h, *inputs.args[b][index], **inputs.kwargs[b][index]))
            for b, h in enumerate(inputs.hidden)]


def advance(block: nn.Module, inputs: BlockInputs, index: int) -> None:
    """Replace `inputs`' hidden states by `block`'s outputs, batch by batch: each batch's input is let go as
    soon as its output exists, so the pass holds one batch more than the hidden states, not a second copy of
    them (151 MB for 128 x 512 windows of a 576-wide fp32 model; 2 GB at 4096 wide). A list of the inputs
    that someone else holds keeps them: `inputs.hidden` becomes a new list."""
    hidden = inputs.hidden = list(inputs.hidden)
    for b, h in enumerate(hidden):
        hidden[b] = _hidden(block(h, *inputs.args[b][index], **inputs.kwargs[b][index]))


@torch.no_grad()
def observe(block: nn.Module, inputs: BlockInputs, index: int, linears: dict[str, nn.Module]):
    """Forward all batches through `block` with hooks on `linears`.

    Returns ``(stats, groups)``: stats per Linear name (Linears fed the same tensor, such as q/k/v,
    share one accumulator), and the groups of Linears in execution order, one group per distinct input.

    The block's output is not needed, so when the first batch called each of `linears` exactly once, the
    later batches stop as soon as all of them have read their input (for a decoder block: before the
    down projection's product and the residual add). A block whose Linears are called a varying number
    of times (an MoE that skips experts) runs in full.
    """
    accs, alias, order = {}, {}, []
    seen = {}  # id(input) -> (input, canonical name); holding the tensor keeps its id unique
    calls: dict[str, int] = {}  # calls per Linear in the current batch
    stop_early = False  # set after the first batch: every Linear was called once

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
            calls[name] = calls.get(name, 0) + 1
            if stop_early and len(calls) == len(linears):
                raise _StopForward  # every Linear has read its input: the rest of the block is not needed
        return fn

    with owned_hooks() as hooks:
        for name, lin in linears.items():
            hooks.forward_pre(lin, hook(name))
        for b, h in enumerate(inputs.hidden):
            seen.clear()
            calls.clear()
            try:
                block(h, *inputs.args[b][index], **inputs.kwargs[b][index])
            except _StopForward:
                pass
            if b == 0:
                stop_early = len(calls) == len(linears) and all(c == 1 for c in calls.values())
        seen.clear()
    stats = {name: accs[alias[name]].result() for name in linears if name in alias}
    groups = [[n for n in linears if alias.get(n) == c] for c in order]
    return stats, groups
