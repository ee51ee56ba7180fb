"""GPTQ: one-shot weight quantization with second-order error compensation (Frantar, Ashkboos,
Hoefler, Alistarh; ICLR 2023; IST-DASLab/gptq, ``GPTQ.fasterquant``).

Columns are quantized left to right; each column's rounding error is spread over the columns not yet
quantized through the upper Cholesky factor of the damped inverse Hessian (H = E[x xᵀ]), with lazy
block updates. The grid is the shared one of :mod:`lmcompose.algebra.quant` (so RTN and GPTQ codes are
comparable), recomputed every `group_size` columns; `act_order` processes columns by decreasing
diag(H) (groups then follow that order and the permutation is stored, unless `static_groups` fixes
every group's grid up front on the original columns, as the reference does). Like the reference, a
group that starts inside a block takes its grid from the weights as updated by earlier blocks only.

On a Sparse term the mask is kept bit-exactly: pruned weights quantize to 0 inside the sweep and their
error is compensated by the kept ones (SparseGPT's joint mode with a fixed mask). On a LowRank term, V
is quantized with the input Hessian, then U with the Hessian of the rank activations (dV̂) H (dV̂)ᵀ.
`true_sequential: true` (a step field every technique has) gives the reference's --true-sequential.

Example::

    steps:
      - gptq: {bits: 4, group_size: 128, act_order: true}
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from ...algebra.quant import QTensor, QuantSpec, grid_params, quantize_to_grid
from ...registry import register
from ..prune.sparsegpt import damped_inverse_cholesky
from .common import QuantConfig


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, *, mask: torch.Tensor | None = None,
                  act_order: bool = False, static_groups: bool = False, percdamp: float = 0.01,
                  blocksize: int = 128) -> tuple[QTensor, dict]:
    """Quantize `w` [rows, cols] with input Gram `h` [cols, cols]; `mask` (True = kept) pins pruned
    entries to zero. Returns (QTensor, info)."""
    w = w.clone().float()
    h = h.to(w.device, torch.float32).clone()
    rows, cols = w.shape
    g = spec.group_size or cols
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    if mask is not None:
        mask = mask.to(w.device)
        w = w * mask
    n_groups = spec.n_groups(cols)
    scales = torch.zeros(rows, n_groups, device=w.device)
    zeros = torch.zeros(rows, n_groups, device=w.device)
    static = None
    if static_groups and spec.group_size:
        static = [grid_params(w[:, k * g:(k + 1) * g], spec) for k in range(n_groups)]
        for k, (s, z) in enumerate(static):
            scales[:, k], zeros[:, k] = s, z
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        if mask is not None:
            mask = mask[:, perm]
    hinv, damp = damped_inverse_cholesky(h, percdamp)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device)
    scale, zero = grid_params(w, spec) if spec.group_size is None else (None, None)
    if spec.group_size is None:
        scales[:, 0], zeros[:, 0] = scale, zero
    loss = torch.zeros(rows, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if spec.group_size is not None:
                if static is not None:
                    k = int(perm[c]) // g if perm is not None else c // g
                    scale, zero = static[k]
                elif c % g == 0:
                    # the reference reads the grid from W, which holds earlier blocks' updates only
                    scale, zero = grid_params(w[:, c:c + g], spec)
                    scales[:, c // g], zeros[:, c // g] = scale, zero
            col = w1[:, i]
            code = quantize_to_grid(col.unsqueeze(1), scale, zero, spec.maxq).squeeze(1)
            q = scale * (code - zero)
            if mask is not None:
                q = q * mask[:, c]
            codes[:, c] = code.to(torch.uint8)
            d = hinv1[i, i]
            e = (col - q) / d
            loss += (col - q) ** 2 / d ** 2 / 2
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    # a per-row grid or static groups do not depend on the column order: no permutation to store
    store_perm = perm if (perm is not None and static is None and spec.group_size) else None
    if perm is not None:
        unperm = torch.empty_like(codes)
        unperm[:, perm] = codes
        codes = unperm
    qt = QTensor(codes, scales, zeros, spec, store_perm)
    return qt, {"damp": damp, "dead_columns": int(dead.sum()), "obs_loss": float(loss.sum())}


@register
class GPTQ(QuantConfig):
    name: ClassVar[str] = "gptq"
    summary: ClassVar[str] = "quantize column by column, compensating each error through the inverse Hessian"

    act_order: bool = Field(False, description="process columns by decreasing diag(H) (the permutation is stored "
                            "unless static_groups)")
    static_groups: bool = Field(False, description="with act_order and a group size: fix every group's grid up "
                                "front on the original column order (no permutation stored)")
    percdamp: float = Field(0.01, gt=0, description="damping added to diag(H), as a fraction of its mean")
    blocksize: int = Field(128, ge=1, description="columns per lazy-update block")

    @property
    def stores_perm(self) -> bool:
        return bool(self.act_order and self.group_size and not self.static_groups)

    def quantize_slot(self, w, hessian, mask, bits):
        qt, _ = gptq_quantize(w.to(hessian.device), hessian, self.qspec(bits), mask=mask,
                                            act_order=self.act_order, static_groups=self.static_groups,
                                            percdamp=self.percdamp, blocksize=self.blocksize)
        return qt
