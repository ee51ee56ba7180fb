"""GPTQ: one-shot weight quantization with second-order error compensation (Frantar, Ashkboos,
Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023; reference code IST-DASLab/gptq, ``GPTQ.fasterquant``).

Idea: minimise the layer objective ‖(W − Ŵ)X‖² = tr(ΔW H ΔWᵀ), H = E[x xᵀ], one column at a time. Column
i is rounded to the grid, and its error, divided by the i-th diagonal entry of U (the upper Cholesky
factor of the damped H⁻¹), is spread over the columns not yet quantized along the i-th row of U (the
Optimal Brain Surgeon update, in the order-fixed form that makes it cheap). Updates inside a block of
`blocksize` columns are applied column by column, the rest of the matrix once per block (lazy batch
updates). Dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column; H is damped by
``percdamp · mean(diag H)``. The grid is the shared one of :mod:`lmcompose.algebra.quant` (``grid_params`` /
``quantize_to_grid``, scales rounded to ``scale_dtype`` before codes are chosen, so RTN and GPTQ are
the same kind of tensor). With a group size, a group's grid is computed when the sweep reaches its
first column, from the weights as updated so far; exactly like the reference, that is the weights
as updated by *earlier blocks* (a group starting inside a block does not see that block's updates).
Without one, each row has one grid computed up front. `act_order` processes columns by decreasing
diag(H); groups are then formed over that order and the permutation is stored (and costed), unless
`static_groups` computes every group's grid up front on the original columns (reference
``--static-groups``; then groups follow the original columns and no permutation is stored).

Quantize-after-prune: on a Sparse term the mask survives bit-exactly. Pruned weights are quantized to
0 inside the sweep and their error is compensated by the kept ones (SparseGPT's joint mode with a
fixed mask); their codes are never stored (``Sparse.weight`` multiplies by the mask). Grids are fitted to
the kept weights only. On a LowRank term, V is quantized with the input Gram H, then U with the Gram of
the rank activations (dV̂) H (dV̂)ᵀ (see ``common.slot_hessians``).

One deliberate difference: with a per-row grid the reference fits it before zeroing dead columns;
here dead columns are zeroed first (their weights never reach the output), as for group grids.

The reference's ``--true-sequential`` (q,k,v → o → up,gate → down, each observed after the previous
group is quantized) is the generic step field ``true_sequential: true``.

Example::

    steps:
      - gptq: {bits: 4, group_size: 128, act_order: true}
      - gptq: {bits: 3, group_size: 64, true_sequential: true, percdamp: 0.01, blocksize: 128}
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, PrivateAttr

from ...algebra.quant import QTensor, QuantSpec, grid_params, quantize_to_grid
from ...core.linalg import damped_inverse_cholesky
from ..base import register
from .common import QuantConfig


def _check(w, h, spec, mask, percdamp, blocksize):
    if w.dim() != 2:
        raise ValueError(f"w must be a matrix [rows, cols]; got shape {tuple(w.shape)}")
    cols = w.shape[1]
    if tuple(h.shape) != (cols, cols):
        raise ValueError(f"h has shape {tuple(h.shape)}; a [{w.shape[0]}, {cols}] weight needs [{cols}, {cols}]")
    if mask is not None and tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; allowed: the weight's shape {tuple(w.shape)}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp={percdamp} is not allowed; allowed: a number >= 0")
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r} is not allowed; allowed: a positive integer")
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"spec must be a QuantSpec; got {type(spec).__name__}")


@torch.no_grad()
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
        loss += (err1.double() ** 2).sum() / 2  # Σ (w − q)² / U_ii² / 2: the reference's `Losses`
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
            "blocksize": blocksize, "dead_columns": int(dead.sum()), "obs_loss": float(loss)}
    return qt, info


@register
class GPTQ(QuantConfig):
    name: ClassVar[str] = "gptq"
    summary: ClassVar[str] = "quantize column by column, compensating each error through the inverse Hessian"

    act_order: bool = Field(False, description="process columns by decreasing diag(H); with a group size, groups "
                            "follow that order and the permutation is stored (unless static_groups)")
    static_groups: bool = Field(False, description="with a group size: compute every group's grid up front on the "
                                "original column order (reference --static-groups; no permutation stored)")
    percdamp: float = Field(0.01, ge=0, description="damping λ added to diag(H), as a fraction of mean(diag H)")
    blocksize: int = Field(128, ge=1, description="columns per lazy-update block")

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

    def apply(self, layer, stats):
        self._slot_infos.clear()
        try:
            new, info = super().apply(layer, stats)
            slots = list(self._slot_infos)
        finally:
            self._slot_infos.clear()
        info.update(act_order=self.act_order, static_groups=self.static_groups, percdamp=self.percdamp,
                    blocksize=self.blocksize, damp=[s["damp"] for s in slots],
                    dead_columns=sum(s["dead_columns"] for s in slots),
                    obs_loss=sum(s["obs_loss"] for s in slots))
        return new, info
