"""Block-wise reconstruction (`reconstruct`): after a decoder block's compression steps, train the continuous
parameters its compressed tensors have, so that the compressed block reproduces the dense block's output
(mean squared error over the calibration windows). The block-wise training of OmniQuant (Shao et al., ICLR
2024), AutoRound (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent") and EfficientQAT's
Block-AP (Chen et al., ACL 2025), on whatever the recipe's earlier steps stored.

What trains is a list (`train`); everything else stays bit-exact, and the bytes do not change:

* ``scales``: the scales of quantized tensors (Adam on log s), rounded to their scale dtype in every forward
  (straight-through); the codes stay fixed unless ``rounding`` trains too;
* ``zeros``: the zero points of asymmetric grids, continuous while training (straight-through round),
  stored back as integer codes;
* ``rounding``: AutoRound's per-weight offsets V in [-0.5, 0.5] (signed gradient descent, lr 1/steps decaying
  linearly to 0); the codes are re-decided on the same grid, clamp(round(W/s + V) + z, 0, maxq), with W the
  float the quantize step rounded (``QTensor.source``);
* ``lowrank``, ``sparse``, ``diag``: the float low-rank factors, the float sparse values inside their mask,
  the stored diagonal d of a low-rank term (Adam; d on log d).

The block loss is measured on all calibration windows before training and every `eval_every` steps on the
tensors exactly as they would be stored; the best measured state is kept, so the block never ends worse than
it started.

Method notes: docs/methods/reconstruct.md

Example::

    steps:
      - rtn: {bits: 2, group_size: 64}
      - reconstruct: {train: rounding+scales, steps: 100}
"""

from __future__ import annotations

import logging
import time
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from ...algebra.quant import QTensor
from ...algebra.spec import LinearSpec
from ...algebra.terms import Sparse, as_float, materialize
from ...core import dtypes as compute
from ...core.dtypes import FLOAT_DTYPES, dtype_name
from ...core.errors import IllegalStep
from ...runtime.model_ops import replace_module
from ..base import Technique, register
from ..fields import joined_parts

log = logging.getLogger(__name__)

TRAINABLE = ("scales", "zeros", "rounding", "lowrank", "sparse", "diag")  # in the order `train` is written
GRID = {"scales": "scale", "zeros": "zero", "rounding": "codes"}  # the parts of a grid each retrains
ADAM_LR = {"scales": 5e-3, "zeros": 1e-2, "lowrank": 1e-4, "sparse": 1e-5, "diag": 5e-3}
CHUNK = 1 << 22  # elements per row chunk of the full-size temporaries of one quantized tensor


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK // max(cols, 1))
    return [slice(r, min(r + step, rows)) for r in range(0, rows, step)]


# -- pure functions ------------------------------------------------------------------------------

def rounded_codes(anchor: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, offsets: torch.Tensor,
                  gidx: torch.Tensor, maxq: int) -> torch.Tensor:
    """AutoRound's codes ``clamp(round(W/s + V) + z, 0, maxq)`` (uint8) of the float `anchor` W [rows, cols]
    with offsets V, on the grid of per-group `scale` and `zero` [rows, groups] (column group `gidx`)."""
    out = torch.empty(anchor.shape, dtype=torch.uint8, device=anchor.device)
    for r in _row_chunks(*anchor.shape):
        s, z = scale[r][:, gidx], zero[r][:, gidx]
        out[r] = torch.clamp(torch.round(anchor[r].float() / s + offsets[r]) + z, 0, maxq).to(torch.uint8)
    return out


class _QuantWeight(torch.autograd.Function):
    """``W = S (c − Z)`` of one quantized tensor, with S, Z its per-group scale and zero spread over the
    columns, and c its codes (fixed) or ``clamp(round(W0/S + V) + Z, 0, maxq)`` (rounding trains). The
    rounding is straight-through and the clamp passes no gradient, as in AutoRound. It saves only its inputs
    and recomputes the full-size intermediates row chunk by row chunk in the backward, so a step holds one
    fp32 matrix per tensor (the output), not half a dozen."""

    @staticmethod
    def forward(ctx, scale, zero, offsets, anchor, codes, gidx, maxq):
        out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
        for r in _row_chunks(*codes.shape):
            s, z = scale[r][:, gidx], zero[r][:, gidx]
            c = codes[r].float() if offsets is None else torch.clamp(
                torch.round(anchor[r].float() / s + offsets[r]) + z, 0, maxq)
            out[r] = s * (c - z)
        ctx.save_for_backward(scale, zero, offsets, anchor, codes, gidx)
        ctx.maxq = maxq
        return out

    @staticmethod
    def backward(ctx, grad):
        scale, zero, offsets, anchor, codes, gidx = ctx.saved_tensors
        want_s, want_z, want_v = ctx.needs_input_grad[:3]
        ds = torch.zeros_like(scale) if want_s else None
        dz = torch.zeros_like(zero) if want_z else None
        dv = torch.empty_like(offsets) if want_v else None
        for r in _row_chunks(*codes.shape):
            g, s, z = grad[r].float(), scale[r][:, gidx], zero[r][:, gidx]
            if offsets is None:
                c, inside, u = codes[r].float(), None, None
            else:
                u = anchor[r].float() / s
                raw = torch.round(u + offsets[r]) + z
                inside = ((raw >= 0) & (raw <= ctx.maxq)).float()
                c = raw.clamp(0, ctx.maxq)
            if want_s:  # d/dS of S (c − Z), with dc/dS = inside · (−W0/S²) through the straight-through round
                ds[r].index_add_(1, gidx, g * (c - z) if inside is None else g * (c - z - inside * u))
            if want_z:  # dc/dZ = inside
                dz[r].index_add_(1, gidx, -g * s if inside is None else g * s * (inside - 1))
            if want_v:
                dv[r] = g * s * inside
        return ds, dz, dv, None, None, None, None


# -- the trainable form of a compressed Linear -----------------------------------------------------

class _Grid:
    """One quantized tensor while it trains: its codes, and the freed parts as fp32 master copies (log of
    the scales, continuous zero points, rounding offsets). `stored()` is the QTensor it would store now."""

    def __init__(self, q: QTensor, parts: set[str]):
        self.q, self.maxq, self.gidx = q, q.spec.maxq, q.group_index()
        self.dtype = FLOAT_DTYPES[q.spec.scale_dtype]
        self.s0 = q.scale.float()
        self.z0 = q.zero.float() if q.zero is not None else torch.full_like(self.s0, (self.maxq + 1) / 2)
        self.log_s = nn.Parameter(torch.zeros_like(self.s0)) if "scales" in parts else None
        self.zf = nn.Parameter(self.z0.clone()) if "zeros" in parts and q.zero is not None else None
        self.anchor = q.source if "rounding" in parts else None
        self.v = nn.Parameter(self._initial_offsets()) if self.anchor is not None else None

    @torch.no_grad()
    def _initial_offsets(self) -> torch.Tensor:
        """V = 0 where the codes are W's nearest ones on the grid (RTN's); elsewhere (GPTQ moved them) the
        offset that reproduces the stored code, clipped to [-0.5, 0.5] (a code V cannot reach moves to the
        nearest one it can)."""
        out = torch.empty(self.q.shape, dtype=torch.float32, device=self.q.codes.device)
        for r in _row_chunks(*self.q.shape):
            s, z = self.s0[r][:, self.gidx], self.z0[r][:, self.gidx]
            u = self.anchor[r].float() / s
            codes = self.q.codes[r].float()
            nearest = torch.clamp(torch.round(u) + z, 0, self.maxq) == codes
            out[r] = torch.where(nearest, 0.0, (codes - z - u).clamp(-0.5, 0.5))
        return out

    def parameters(self) -> dict[str, list[nn.Parameter]]:
        out = {"scales": [self.log_s], "zeros": [self.zf], "rounding": [self.v]}
        return {k: v for k, v in out.items() if v[0] is not None}

    def scale(self) -> torch.Tensor:
        """The scales as stored (rounded to the scale dtype), with the gradient of the fp32 master copy."""
        if self.log_s is None:
            return self.s0
        s = self.s0 * torch.exp(self.log_s)
        stored = s.detach().to(self.dtype).float().clamp(torch.finfo(self.dtype).tiny, torch.finfo(self.dtype).max)
        return s + (stored - s).detach()

    def zero(self) -> torch.Tensor:
        if self.zf is None:
            return self.z0
        z = self.zf.clamp(0, self.maxq)
        return z + (torch.round(z) - z).detach()

    def weight(self) -> torch.Tensor:
        return _QuantWeight.apply(self.scale(), self.zero(), self.v, self.anchor, self.q.codes, self.gidx, self.maxq)

    @torch.no_grad()
    def stored(self) -> QTensor:
        scale, zero = self.scale().to(self.dtype), self.zero()
        codes = self.q.codes if self.v is None else rounded_codes(self.anchor, scale.float(), zero, self.v, self.gidx,
                                                                  self.maxq)
        return QTensor(codes, scale, zero, self.q.spec, self.q.perm, self.q.source)


class _Float:
    """A float tensor while it trains (fp32 master copy); a sparse term's values stay zero outside its mask."""

    def __init__(self, t: torch.Tensor, mask: torch.Tensor | None = None):
        self.p, self.mask, self.dtype = nn.Parameter(t.detach().float()), mask, dtype_name(t.dtype)

    def weight(self) -> torch.Tensor:
        return self.p if self.mask is None else self.p * self.mask

    @torch.no_grad()
    def stored(self) -> torch.Tensor:
        return as_float(self.weight(), self.dtype)


class _Term:
    """One term of a Linear, each of its stored tensors a `_Grid`, a `_Float` or left as it is."""

    def __init__(self, term, parts: set[str]):
        self.term, self.missing_source = term, 0
        self.mask = term.mask if isinstance(term, Sparse) else None
        self.slots = {}
        for name, t in term.slots().items():
            if isinstance(t, QTensor):
                grid = parts & set(GRID)
                if "rounding" in grid and t.source is None:
                    grid.discard("rounding")
                    self.missing_source += 1
                if grid and (grid != {"zeros"} or t.zero is not None):
                    self.slots[name] = _Grid(t, grid)
            elif term.kind in parts:
                self.slots[name] = _Float(t, self.mask)
        self.log_d = None
        if term.kind == "lowrank" and term.d is not None and "diag" in parts:
            self.log_d = nn.Parameter(torch.zeros(term.d.shape, dtype=torch.float32, device=term.d.device))

    @property
    def trained(self) -> bool:
        return bool(self.slots) or self.log_d is not None

    def parameters(self) -> dict[str, list[nn.Parameter]]:
        out: dict[str, list] = {}
        for s in self.slots.values():
            for part, ps in (s.parameters().items() if isinstance(s, _Grid) else [(self.term.kind, [s.p])]):
                out.setdefault(part, []).extend(ps)
        if self.log_d is not None:
            out.setdefault("diag", []).append(self.log_d)
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part, ps in self.parameters().items():
            kept = int(self.mask.sum()) if part == "sparse" else None
            out[part] = out.get(part, 0) + (kept if kept is not None else sum(p.numel() for p in ps))
        return out

    def slot(self, name: str) -> torch.Tensor:
        s = self.slots.get(name)
        return materialize(self.term.slots()[name], torch.float32) if s is None else s.weight()

    def weight(self) -> torch.Tensor:
        """A dense or sparse term's matrix (fp32, with the gradient of what trains)."""
        w = self.slot(next(iter(self.term.slots())))
        return w if self.mask is None else w * self.mask

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A low-rank term's (U, diag(d) V)."""
        u, v = self.slot("u"), self.slot("v")
        if self.term.d is not None:
            d = self.term.d.float() if self.log_d is None else self.term.d.float() * torch.exp(self.log_d)
            v = d.unsqueeze(1) * v
        return u, v

    @torch.no_grad()
    def stored(self):
        new = {name: s.stored() for name, s in self.slots.items()}
        if self.log_d is not None:
            new["d"] = as_float(self.term.d.float() * torch.exp(self.log_d), dtype_name(self.term.d.dtype))
        return self.term.replace(**new) if new else self.term


class _Training(nn.Module):
    """Stands in for one CompressedLinear inside the block while it trains: the same function of its input,
    rebuilt every forward from the trained parts; the terms that do not train are summed once."""

    def __init__(self, layer, parts: set[str]):
        super().__init__()
        self.layer = [layer]  # a list, so the layer is not registered as a submodule
        self.terms = [_Term(t, parts) for t in layer.terms]
        frozen = [t.term for t in self.terms if not t.trained and t.term.kind != "lowrank"]
        self.frozen = torch.stack([t.weight(torch.float32) for t in frozen]).sum(0) if frozen else None
        self.frozen_lowrank = [t.term.factors(torch.float32) for t in self.terms
                               if not t.trained and t.term.kind == "lowrank"]
        self.bias = None if layer.bias_value is None else layer.bias_value.float()

    def parameters_by_part(self) -> dict[str, list[nn.Parameter]]:
        out: dict[str, list] = {}
        for t in self.terms:
            for part, ps in t.parameters().items():
                out.setdefault(part, []).extend(ps)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer[0]
        if layer.input_ops:
            x = layer.transform_input(x)
        w = self.frozen
        for t in self.terms:
            if t.trained and t.term.kind != "lowrank":
                w = t.weight() if w is None else w + t.weight()
        y = F.linear(x, w, self.bias) if w is not None else None
        factors = self.frozen_lowrank + [t.factors() for t in self.terms if t.trained and t.term.kind == "lowrank"]
        for u, v in factors:
            z = F.linear(F.linear(x, v), u)
            y = z if y is None else y + z
        if w is None and self.bias is not None:
            y = y + self.bias
        return y

    def stored(self):
        return self.layer[0].with_terms([t.stored() for t in self.terms])


# -- running the block ----------------------------------------------------------------------------

def _take(obj, rows: torch.Tensor, n: int):
    """`obj` (a block argument) restricted to the windows `rows` of a calibration batch of `n`: tensors of two
    or more dimensions whose first is the batch (hidden states, masks, rotary tables); anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj[rows.to(obj.device)] if obj.dim() >= 2 and obj.shape[0] == n else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(o, rows, n) for o in obj)
    if isinstance(obj, dict):
        return {k: _take(v, rows, n) for k, v in obj.items()}
    return obj


def _block_output(block: nn.Module, inputs, index: int, b: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The block's output on calibration batch `b` (only its windows `rows`, if given), called as the
    sequential loop calls it (`pipeline.passes.run_block`)."""
    h, args, kwargs = inputs.hidden[b], inputs.args[b][index], inputs.kwargs[b][index]
    if rows is not None and len(rows) < h.shape[0]:
        n = h.shape[0]
        h, args, kwargs = h[rows.to(h.device)], _take(args, rows, n), _take(kwargs, rows, n)
    out = block(h, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _install(block: nn.Module, prefix: str, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        replace_module(block, name[len(prefix) + 1:], module)  # an online output rotation stays on the Linear


@torch.no_grad()
def block_loss(block: nn.Module, inputs, targets: list[torch.Tensor], index: int, forwards) -> float:
    """Mean squared error of the block's outputs against `targets` over every calibration window."""
    sse, count = 0.0, 0
    for b, target in enumerate(targets):
        with forwards():
            out = _block_output(block, inputs, index, b)
        diff = out.float() - target.float()
        sse += float(diff.pow(2).sum(dtype=torch.float64))
        count += diff.numel()
    return sse / count


class _Windows:
    """Calibration windows drawn `batch_size` at a time in a seeded random order, reshuffled every epoch;
    returned grouped by calibration batch: ``{batch: row indices}``."""

    def __init__(self, sizes: list[int], batch_size: int, seed: int):
        self.all = [(b, r) for b, n in enumerate(sizes) for r in range(n)]
        self.batch_size = min(batch_size, len(self.all))
        self.gen, self.order = torch.Generator().manual_seed(seed), []

    def next(self) -> dict[int, torch.Tensor]:
        take = []
        while len(take) < self.batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.all), generator=self.gen).tolist()
            take.append(self.all[self.order.pop()])
        groups: dict[int, list[int]] = {}
        for b, r in sorted(take):
            groups.setdefault(b, []).append(r)
        return {b: torch.tensor(rows) for b, rows in groups.items()}


def _frozen_block(block: nn.Module):
    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    return flags


def _codes_changed(before, after) -> tuple[int, int]:
    """(codes that differ, codes stored) over the quantized tensors of two layers of one structure."""
    changed = total = 0
    for t0, t1 in zip(before.terms, after.terms):
        keep = getattr(t0, "mask", None)
        for name, q0 in t0.slots().items():
            if isinstance(q0, QTensor):
                diff = q0.codes != t1.slots()[name].codes
                changed += int(diff[keep].sum() if keep is not None else diff.sum())
                total += int(keep.sum()) if keep is not None else diff.numel()
    return changed, total


@register
class Reconstruct(Technique):
    name: ClassVar[str] = "reconstruct"
    family: ClassVar[str] = "train"
    summary: ClassVar[str] = ("block-wise reconstruction: trains scales, zero points, rounding, float factors or "
                              "sparse values of the compressed block against the dense block's output")
    unit: ClassVar[str] = "block"

    train: str = Field("scales+rounding", description="what trains, '+'-joined (or a list): scales (codes fixed "
                       "unless rounding trains), zeros (asymmetric grids), rounding (AutoRound's offsets; codes "
                       "re-decided on the same grid), lowrank (float factors), sparse (float values inside their "
                       "mask), diag (a low-rank term's stored d)")
    steps: int = Field(100, ge=0, description="optimizer steps per block (0: nothing trains)")
    lr: dict[str, float] | None = Field(None, description="learning rate per trained part, replacing its default: "
                                        "rounding 1/steps (signed gradient descent, linear decay to 0), scales "
                                        "5e-3 (Adam on log s), zeros 1e-2 (Adam, in code units), lowrank 1e-4, "
                                        "sparse 1e-5 (Adam), diag 5e-3 (Adam on log d)")
    batch_size: int = Field(4, ge=1, description="calibration windows per step")
    eval_every: int = Field(10, ge=1, description="steps between measurements of the block loss on all "
                            "calibration windows (the best measured state is kept)")
    target_input: Literal["dense", "compressed"] = Field(
        "dense", description="the inputs of the dense block whose outputs are the target: the dense model's "
        "stream (OmniQuant, AutoRound, EfficientQAT) or the compressed model's inputs to this block")
    seed: int = Field(0, description="seed of the order in which windows are drawn")

    @field_validator("train", mode="before")
    @classmethod
    def _train(cls, value):
        return joined_parts(value, TRAINABLE, "rounding+scales")

    @model_validator(mode="after")
    def _rates(self):
        for part, lr in (self.lr or {}).items():
            if part not in self.parts:
                raise ValueError(f"lr names {part!r}, which does not train (train={self.train!r})")
            if not lr > 0:
                raise ValueError(f"lr[{part!r}]={lr!r} must be > 0")
        return self

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.train.split("+"))

    def rate(self, part: str) -> float:
        default = 1.0 / max(self.steps, 1) if part == "rounding" else ADAM_LR[part]
        return (self.lr or {}).get(part, default)

    @property
    def trains(self) -> bool:
        return self.steps > 0

    @property
    def retrains_grid(self) -> frozenset[str]:
        return frozenset(GRID[p] for p in self.parts if p in GRID) if self.steps > 0 else frozenset()

    # -- typing and costing --------------------------------------------------------------------
    @staticmethod
    def trainable_parts(spec: LinearSpec) -> set[str]:
        """The parts that find something to train in a Linear of this structure."""
        found = set()
        for term in spec.terms:
            for ts in term.tensors().values():
                if ts.quantized:
                    found |= {"scales", "rounding"} | (set() if ts.quant.symmetric else {"zeros"})
                elif term.kind in ("lowrank", "sparse"):
                    found.add(term.kind)
            if term.kind == "lowrank" and term.d is not None:
                found.add("diag")
        return found

    def plan(self, spec: LinearSpec) -> LinearSpec:
        found = self.trainable_parts(spec)
        if not found & set(self.parts):
            has = f"; it has {' and '.join(sorted(found))}" if found else ""
            raise IllegalStep(f"train={self.train!r} finds nothing to train in {spec.describe()}{has} (put "
                              f"{self.name} after a step that quantizes, or factorizes, or prunes)")
        return spec

    # -- the work ------------------------------------------------------------------------------
    def apply(self, layer, stats):
        raise IllegalStep(f"{self.name} trains a whole decoder block against the dense block's output; it runs in "
                          "the sequential pipeline (unit 'block'), not on one Linear alone")

    def apply_block(self, context) -> dict:
        if context.targets is None:
            raise RuntimeError(f"{self.name}: the pipeline gave no dense targets for block {context.index}")
        layers = {n: context.block.get_submodule(n[len(context.prefix) + 1:]) for n in context.names}
        return reconstruct_block(self, context.block, context.prefix, context.index, layers, context.inputs,
                                 context.targets, context.compute_dtype, context.device)


def reconstruct_block(cfg: Reconstruct, block: nn.Module, prefix: str, index: int, layers: dict, inputs, targets,
                      compute_dtype: str = "fp32", device=None) -> dict:
    """Train the parts `cfg.parts` of the CompressedLinears `layers` (full names under `prefix`) of `block`
    so that its outputs on `inputs` match `targets`; returns ``{name: (layer, info)}`` with the best layers
    measured (the ones given, if training never beat them). The block is left holding the given layers."""
    device = device if device is not None else inputs.hidden[0].device

    def forwards():
        return compute.autocast(compute_dtype, device)

    t0 = time.perf_counter()
    before = block_loss(block, inputs, targets, index, forwards)
    best, best_step, after, best_layers = before, 0, before, dict(layers)
    trainers = {n: _Training(layer, set(cfg.parts)) for n, layer in layers.items()}
    groups = {}
    for t in trainers.values():
        for part, ps in t.parameters_by_part().items():
            groups.setdefault(part, []).extend(ps)
    evaluations, step_seconds = 0, 0.0
    if cfg.steps and groups:
        adam_groups = [{"params": ps, "lr": cfg.rate(part)} for part, ps in groups.items() if part != "rounding"]
        adam = torch.optim.Adam(adam_groups) if adam_groups else None
        offsets = groups.get("rounding", [])
        windows = _Windows([h.shape[0] for h in inputs.hidden], cfg.batch_size, cfg.seed)
        flags = _frozen_block(block)
        try:
            for step in range(cfg.steps):
                s0 = time.perf_counter()
                _install(block, prefix, trainers)
                with torch.enable_grad():
                    draw = windows.next()
                    n_windows = sum(len(rows) for rows in draw.values())
                    for b, rows in draw.items():
                        with forwards():
                            out = _block_output(block, inputs, index, b, rows)
                        target = targets[b][rows.to(targets[b].device)]
                        # the squared error summed per window (not averaged over elements): gradients stay
                        # well above the underflow of a half-precision backward; Adam and signs ignore scale
                        ((out.float() - target.float()).pow(2).sum() / n_windows).backward()
                with torch.no_grad():
                    if adam is not None:
                        adam.step()
                        adam.zero_grad(set_to_none=True)
                    lr = cfg.rate("rounding") * (1 - step / cfg.steps)  # AutoRound: linear decay to 0
                    for v in offsets:
                        if v.grad is not None:
                            v.sub_(lr * v.grad.sign()).clamp_(-0.5, 0.5)
                            v.grad = None
                step_seconds += time.perf_counter() - s0
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    stored = {n: t.stored() for n, t in trainers.items()}
                    _install(block, prefix, stored)
                    after = block_loss(block, inputs, targets, index, forwards)
                    for m in stored.values():
                        m._cache = None  # its forward's dequantized copy: rebuilt when the model next runs
                    evaluations += 1
                    log.info("%s block %d step %d: block loss %.4e (before %.4e)", cfg.name, index, step + 1, after,
                             before)
                    if after < best:
                        best, best_step, best_layers = after, step + 1, stored
        finally:
            _install(block, prefix, layers)
            for p, flag in flags:
                p.requires_grad_(flag)
    common = {"loss_before": before, "loss_after": after, "loss_best": best, "best_step": best_step,
              "evaluations": evaluations, "seconds_per_step": step_seconds / max(cfg.steps, 1) if groups else 0.0,
              "block_seconds": round(time.perf_counter() - t0, 3)}
    out = {}
    for n, layer in layers.items():
        t = trainers[n]
        counts: dict[str, int] = {}
        for term in t.terms:
            for part, k in term.counts().items():
                counts[part] = counts.get(part, 0) + k
        info = {**common, "trained": counts}
        missing = sum(term.missing_source for term in t.terms)
        if missing:
            info["rounding_without_source"] = missing
            log.warning("%s: %d quantized tensor(s) keep their codes: the quantize step did not keep the float it "
                        "rounded (QTensor.source), so their rounding cannot train", n, missing)
        if "rounding" in cfg.parts:
            changed, total = _codes_changed(layer, best_layers[n])
            info["codes_changed"] = changed / max(total, 1)
        out[n] = (best_layers[n], info)
    return out
