"""What a decoder block computes, read from one traced forward: which norm feeds which Linears, which
modules write the residual stream, and which Linear's output channels a Linear reads one to one.

Transforms that change bases (rotations of the residual stream, AWQ's per-channel scales) must know
where a scale can be folded and which weights see the residual stream. This is found from the block
itself, never from the model family or module names:

* a module's *producer* is the module whose output tensor is its input tensor (hooks record tensor ids);
* a *norm* is a module without Linears inside whose output does not change when its input is scaled
  (``f(c·x) = f(x)``) and that acts on each position with one per-channel weight: its effective weight
  is read by feeding it a constant vector, and `norm_weight` / `set_norm_weight` read and write it
  through whatever parametrization the module uses (``w`` or Gemma's ``1 + w``), found by probing;
* a norm *reads the residual* when its input is the block input or is produced by no module (the sum
  ``h + Δ``); otherwise it is a *post-norm* (Gemma-3's sandwich norms) of the module producing its input;
* the *residual writers* are the modules whose outputs are the block's two residual updates: with h the
  block input, m the input of the second residual-reading norm and o the block output, the writers'
  outputs equal m − h and o − m (compared numerically);
* a Linear *reads a predecessor's channels* when scaling the predecessor's output rows by a positive
  vector c scales the Linear's input by exactly c (up → down through ``act(gate) · up``, v → o through
  multi-head attention): probed by one forward per candidate of matching width.

Example::

    s = trace_block(block, inputs, index=0)
    s.readers["input_layernorm"]       # ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj']
    s.writers                          # ['self_attn.o_proj', 'mlp.down_proj'] (Llama), post-norms (Gemma-3)
    s.channel_source["mlp.down_proj"]  # 'mlp.up_proj'
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..runtime.linear import CompressedLinear
from .hooks import owned_hooks
from .passes import BlockInputs

LINEAR_TYPES = (nn.Linear, CompressedLinear)


class StructureError(ValueError):
    """The block does not have the structure a transform needs (named in the message)."""


@dataclass
class BlockStructure:
    """Module names are relative to the block (e.g. ``self_attn.q_proj``)."""

    linears: list[str]                                        # in execution order
    norms: list[str]                                          # norm modules, in execution order
    producer: dict[str, str | None] = field(default_factory=dict)  # module -> module whose output it reads
    readers: dict[str, list[str]] = field(default_factory=dict)    # residual-reading norm -> Linears it feeds
    post_norms: dict[str, str] = field(default_factory=dict)       # post-norm -> module whose output it reads
    writers: list[str] = field(default_factory=list)               # modules whose output is a residual update
    channel_source: dict[str, str] = field(default_factory=dict)   # Linear -> Linear whose channels it reads

    def residual_readers(self) -> list[str]:
        return [lin for lins in self.readers.values() for lin in lins]


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, LINEAR_TYPES) for m in module.modules())


def _norm_param(module: nn.Module) -> nn.Parameter | None:
    params = list(module.parameters(recurse=False))
    return params[0] if len(params) == 1 and params[0].dim() == 1 else None


@torch.no_grad()
def _is_norm(module: nn.Module, width: int) -> bool:
    """Scale-invariant and per-channel: f(c·x) = f(x) for c > 0, and one 1-D parameter of the width."""
    p = _norm_param(module)
    if p is None or p.shape[0] != width or _has_linear(module) or isinstance(module, LINEAR_TYPES):
        return False
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype) + 0.5
    try:
        a, b = module(x), module(7.0 * x)
    except Exception:  # noqa: BLE001 - a module that cannot run on a plain tensor is not a norm
        return False
    if not isinstance(a, torch.Tensor) or a.shape != x.shape:
        return False
    return torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4)


@torch.no_grad()
def norm_weight(module: nn.Module) -> torch.Tensor:
    """The effective per-channel weight g of a scale-invariant norm: f(x) = g ⊙ x / rms(x) (fp32).

    Read with a constant input of large magnitude (rms = c, so eps is negligible)."""
    p = _norm_param(module)
    x = torch.full((1, p.shape[0]), 1e3, dtype=torch.float32, device=p.device)
    return (module(x.to(p.dtype)).float() / 1.0).reshape(-1)


@torch.no_grad()
def set_norm_weight(module: nn.Module, g: torch.Tensor) -> None:
    """Make the norm's effective weight `g`, whatever its parametrization (``w`` or ``1 + w``): the
    effective weight is affine in the parameter, so two probes (parameter 0 and 1) give it."""
    p = _norm_param(module)
    old = p.data.clone()
    p.data.zero_()
    at0 = norm_weight(module)
    p.data.fill_(1.0)
    at1 = norm_weight(module)
    slope = at1 - at0
    if (slope.abs() < 1e-6).any():
        p.data.copy_(old)
        raise StructureError(f"{type(module).__name__}: its weight does not act as a per-channel scale")
    p.data.copy_(((g.to(at0) - at0) / slope).to(p.dtype))


def _run(block: nn.Module, inputs: BlockInputs, index: int, batch: int = 0):
    out = block(inputs.hidden[batch], *inputs.args[batch][index], **inputs.kwargs[batch][index])
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def trace_block(block: nn.Module, inputs: BlockInputs, index: int, probe_channels: bool = True) -> BlockStructure:
    """The structure of decoder block `index` (see the module docstring), from its first calibration batch."""
    width = inputs.hidden[0].shape[-1]
    outputs: dict[int, str] = {}      # id(output tensor) -> module name
    seen_inputs: dict[str, torch.Tensor] = {}
    produced_by: dict[str, str | None] = {}
    order: list[str] = []
    captured: dict[str, torch.Tensor] = {}
    h = inputs.hidden[0]
    keep = [h]  # hold tensors so their ids stay unique during the forward

    def pre(name):
        def fn(module, args):
            if args and isinstance(args[0], torch.Tensor):
                x = args[0]
                keep.append(x)
                seen_inputs[name] = x
                produced_by[name] = "<input>" if x is h else outputs.get(id(x))
        return fn

    def post(name):
        def fn(module, args, out):
            y = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(y, torch.Tensor):
                keep.append(y)
                outputs[id(y)] = name
                captured[name] = y
                order.append(name)
        return fn

    interesting = {n: m for n, m in block.named_modules() if n and (isinstance(m, LINEAR_TYPES) or
                                                                    _is_norm(m, width) or _norm_param(m) is not None)}
    with owned_hooks() as hooks:
        for n, m in interesting.items():
            hooks.forward_pre(m, pre(n))
            hooks.forward(m, post(n))
        out = _run(block, inputs, index)
    linears = [n for n in order if isinstance(block.get_submodule(n), LINEAR_TYPES)]
    norms = [n for n in order if n in interesting and not isinstance(block.get_submodule(n), LINEAR_TYPES)
             and _is_norm(block.get_submodule(n), width)]
    s = BlockStructure(linears, norms, {n: (None if p in (None, "<input>") else p) for n, p in produced_by.items()})
    residual_norms = [n for n in norms if produced_by.get(n) in ("<input>", None)]
    for n in norms:
        if n in residual_norms:
            s.readers[n] = [lin for lin in linears if produced_by.get(lin) == n]
        else:
            s.post_norms[n] = produced_by.get(n)
    # residual updates: h -> m (input of the second residual-reading norm) -> out
    if len(residual_norms) >= 2:
        mid = seen_inputs[residual_norms[1]]
        deltas = [mid - h, out - mid]
    else:
        deltas = [out - h]
    for delta in deltas:
        scale = delta.float().abs().max().clamp_min(1e-12)
        hits = [n for n, y in captured.items() if y.shape == delta.shape
                and ((y.float() - delta.float()).abs().max() / scale) < 1e-3]
        if hits:
            s.writers.append(hits[-1])  # the last module producing the update (a post-norm over its Linear)
    if probe_channels:
        s.channel_source = _channel_sources(block, inputs, index, linears, seen_inputs)
    return s


@torch.no_grad()
def _channel_sources(block, inputs, index, linears, seen_inputs) -> dict[str, str]:
    """For each Linear, the earlier Linear whose output rows scale its input channels one to one."""
    out = {}
    for j, name in enumerate(linears):
        lin = block.get_submodule(name)
        base = seen_inputs[name].float()
        for cand in linears[:j]:
            src = block.get_submodule(cand)
            if not isinstance(src, nn.Linear) or src.out_features != lin.in_features:
                continue
            c = torch.rand(src.out_features, generator=torch.Generator().manual_seed(j), dtype=torch.float32) + 0.5
            c = c.to(src.weight.device)
            old_w = src.weight.data.clone()
            old_b = None if src.bias is None else src.bias.data.clone()
            src.weight.data.mul_(c.to(src.weight.dtype).unsqueeze(1))
            if src.bias is not None:
                src.bias.data.mul_(c.to(src.bias.dtype))
            got = {}
            try:
                torch.clear_autocast_cache()  # else autocast reuses its cast of the weight as it was before
                with owned_hooks() as hooks:
                    hooks.forward_pre(lin, lambda m, a, got=got: got.setdefault("x", a[0].float()))
                    _run(block, inputs, index)
            finally:
                src.weight.data.copy_(old_w)
                if old_b is not None:
                    src.bias.data.copy_(old_b)
                torch.clear_autocast_cache()
            x = got.get("x")
            if x is None:
                continue
            expected = base * c.to(base.device)
            # to the precision the block ran in (bf16 under autocast): a wrong source is off by O(c) ~ 0.5
            tol = max(1e-3, 4 * torch.finfo(seen_inputs[name].dtype).eps)
            if ((x - expected).abs().max() / expected.abs().max().clamp_min(1e-12)) < tol:
                out[name] = cand
                break
    return out
