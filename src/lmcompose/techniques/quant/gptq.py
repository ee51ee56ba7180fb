"""GPTQ: one-shot weight quantization with second-order error compensation (Frantar, Ashkboos,
Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023; reference code IST-DASLab/gptq, ``GPTQ.fasterquant``).

Columns are rounded one at a time to the shared grid of :mod:`lmcompose.algebra.quant`; each column's
error is spread over the columns not yet quantized through the upper Cholesky factor of the damped H⁻¹
(the Optimal Brain Surgeon update, applied lazily per block of `blocksize` columns). Options: group
grids, `act_order` (with a stored permutation) and `static_groups`. On a Sparse term the mask survives
bit-exactly; on a LowRank term V and then U are quantized, each with the Gram of its own inputs.

Method notes: docs/methods/gptq.md

Example::

    steps:
      - gptq: {bits: 4, group_size: 128, act_order: true}
      - gptq: {bits: 3, group_size: 64, true_sequential: true, percdamp: 0.01, blocksize: 128}
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import PrivateAttr

from ...algebra.quant import QTensor, QuantSpec, grid_params, quantize_to_grid
from ...core.linalg import damped_inverse_cholesky, solver_threads
from ..base import register
from ..fields import setting
from .common import QuantConfig


def _check(w, h, spec, mask, percdamp, blocksize):
    if w.dim() != 2:
        raise ValueError(f"w must be a matrix [rows, cols]; got shape {tuple(w.shape)}")
    cols = w.shape[1]
    if tuple(h.shape) != (cols, cols):
        raise ValueError(f"h has shape {tuple(h.shape)}; a [{w.shape[0]}, {cols}] weight needs [{cols}, {cols}]")
    if mask is not None and tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; allowed: the weight's shape {tuple(w.shape)}")
    if not (percdamp >= 0 and math.isfinite(percdamp)):
        raise ValueError(f"percdamp={percdamp} is not allowed; allowed: a finite number >= 0")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r} is not allowed; allowed: a positive integer")
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a QuantSpec; got {type(spec).__name__}")


@torch.no_grad()
@solver_threads
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, *, mask: torch.Tensor | None = None,
                  act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
                  blocksize: int = 128) -> tuple[QTensor, dict]:
    """Quantize `w` [rows, cols] given the input Gram `h` [cols, cols] (any positive scale), as the
    reference ``fasterquant``. `mask` (bool, True = kept) pins pruned entries to a dequantized 0 and
    lets the kept weights compensate for them. Returns (QTensor, info); the QTensor carries the column
    permutation when act_order forms groups over it (act_order, a group size, not static_groups).
    """
    _check(w, h, spec, mask, percdamp, blocksize)
    w = w.to(dtype=torch.float32, copy=True)
    dev = w.device
    h = h.to(dev, torch.float32).clone()
    if not torch.isfinite(h).all() or not torch.isfinite(w).all():
        raise ValueError(f"GPTQ: non-finite entries in the weight or the Hessian of the {tuple(w.shape)} layer")
    rows, cols = w.shape
    g = spec.group_size or cols
    n_groups = spec.n_groups(cols)
    grouped = spec.group_size is not None

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    if mask is not None:
        mask = mask.to(dev, torch.bool)
        w = w * mask
    scales = torch.empty(rows, n_groups, device=dev)
    zeros = torch.empty(rows, n_groups, device=dev)
    static = grouped and static_groups
    if static or not grouped:  # grids fixed up front, on the original column order
        for k in range(n_groups):
            scales[:, k], zeros[:, k] = grid_params(w[:, k * g:(k + 1) * g], spec)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        if mask is not None:
            mask = mask[:, perm]
    # group of each position of the sweep (static groups follow the original columns)
    orig = perm.tolist() if perm is not None else range(cols)
    group_of = [c // g for c in orig] if static else [c // g for c in range(cols)]

    hinv, damp = damped_inverse_cholesky(h, percdamp, layer_shape=(rows, cols))
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    row_loss = torch.zeros(rows, dtype=torch.float64, device=dev)  # the same, per row (stacked layers)
    scale, zero = scales[:, 0], zeros[:, 0]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if grouped and not static and c % g == 0:
                # the reference reads W, which holds the updates of earlier blocks only
                block = w[:, c:c + g] if mask is None else w[:, c:c + g] * mask[:, c:c + g]
                scales[:, c // g], zeros[:, c // g] = grid_params(block, spec)
            scale, zero = scales[:, group_of[c]], zeros[:, group_of[c]]
            col = w1[:, i]
            code = quantize_to_grid(col.unsqueeze(1), scale, zero, spec.maxq).squeeze(1)
            codes[:, c] = code.to(torch.uint8)
            q = scale * (code - zero)
            if mask is not None:
                q = q * mask[:, c]
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= torch.outer(e, hinv1[i, i:])
            err1[:, i] = e
        sq = err1.double() ** 2
        loss += sq.sum() / 2  # Σ (w − q)² / U_ii² / 2: the reference's `Losses`
        row_loss += sq.sum(1) / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        unperm = torch.empty_like(codes)
        unperm[:, perm] = codes
        codes = unperm
    # per-row grids and static groups do not depend on the order: no permutation to store
    stored_perm = perm if (perm is not None and grouped and not static) else None
    qt = QTensor(codes, scales, zeros, spec, stored_perm)
    info = {"bits": spec.bits, "group_size": spec.group_size, "symmetric": spec.symmetric,
            "act_order": act_order, "static_groups": static, "percdamp": percdamp, "damp": damp,
            "blocksize": blocksize, "dead_columns": int(dead.sum()), "obs_loss": float(loss),
            "row_loss": row_loss}
    return qt, info


@register
class GPTQ(QuantConfig):
    name: ClassVar[str] = "gptq"
    summary: ClassVar[str] = "quantize column by column, compensating each error through the inverse Hessian"
    row_separable: ClassVar[bool] = True  # given H, the sweep's updates stay within each row

    act_order: bool = setting("act_order")
    static_groups: bool = setting("static_groups")
    percdamp: float = setting("percdamp")
    blocksize: int = setting("blocksize")

    _slot_infos: list = PrivateAttr(default_factory=list)

    @property
    def stores_perm(self) -> bool:
        return bool(self.act_order and self.group_size and not self.static_groups)

    def quantize_slot(self, w, hessian, mask, bits):
        qt, info = gptq_quantize(w.to(hessian.device), hessian, self.qspec(bits), mask=mask,
                                 act_order=self.act_order, static_groups=self.static_groups,
                                 percdamp=self.percdamp, blocksize=self.blocksize)
        self._slot_infos.append(info)
        return qt

    def _info(self, info: dict, slots: list[dict], obs_loss: float) -> dict:
        info.update(act_order=self.act_order, static_groups=self.static_groups, percdamp=self.percdamp,
                    blocksize=self.blocksize, damp=[s["damp"] for s in slots],
                    dead_columns=sum(s["dead_columns"] for s in slots), obs_loss=obs_loss)
        return info

    def apply(self, layer, stats):
        self._slot_infos.clear()
        try:
            new, info = super().apply(layer, stats)
            slots = list(self._slot_infos)
        finally:
            self._slot_infos.clear()
        return new, self._info(info, slots, sum(s["obs_loss"] for s in slots))

    def apply_stacked(self, layers, stats):
        self._slot_infos.clear()
        try:
            made = super().apply_stacked(layers, stats)
            slots = list(self._slot_infos)
        finally:
            self._slot_infos.clear()
        if made is None:
            return None
        out, start = [], 0
        for layer, info in made:  # each layer's share of the one sweep: its own rows' loss
            end = start + layer.out_features
            out.append((layer, self._info(info, slots, float(slots[0]["row_loss"][start:end].sum()))))
            start = end
        return out
