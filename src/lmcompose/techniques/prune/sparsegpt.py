"""SparseGPT: one-shot OBS pruning with second-order weight updates (Frantar & Alistarh, ICML 2023;
IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``).

The layer objective is ‖(W − Ŵ)X‖² = tr(ΔW H ΔWᵀ) with H the Gram of the inputs (the reference scales
it as 2/N·XᵀX, ``stats.gram`` is XᵀX/N; the scale cancels everywhere because the damping is relative
to mean(diag H)). Dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column; H is damped by
``percdamp``·mean(diag H) and U = upper Cholesky factor of H⁻¹. Columns are swept left to right in
blocks of ``blocksize``: for column i the pruned entries are zeroed, the error (w − q)/U_ii is spread
over the columns not yet processed through row i of U, and the block's errors update the later blocks
in one matrix product (lazy updates). The unstructured mask is chosen per block, over all rows and the
block's columns, by w²/U_jj² (the reference's adaptive mask); an N:M mask per row inside each group of
M columns, when the sweep reaches the group.

Difference from the reference, kept on purpose: the reference prunes every entry ``<=`` the score at
sorted position ``int(numel·s)`` of a block, i.e. ``int(numel·s) + 1`` entries (more on ties); here a
block prunes exactly ``int(numel·s)`` entries (or the count a byte ``ratio`` allows), so the bytes
``Recipe.check`` predicts are the bytes produced and ``sparsity: 0`` returns W.

Example::

    steps:
      - sparsegpt: {sparsity: 0.5}
      - sparsegpt: {pattern: "2:4", percdamp: 0.01, blocksize: 128}
      - sparsegpt: {ratio: 0.6, precision: fp64}
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...algebra.linear import CompressedLinear
from ...algebra.quant import dtype_name
from ...algebra.spec import LinearSpec, SparseSpec
from ...algebra.terms import Sparse, as_float
from ...registry import register
from ..budget import budget_bytes, largest_within
from .common import PruneConfig, matrix_topk_mask, parse_pattern

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


# -- pure functions ------------------------------------------------------------------------------


def damped_inverse_cholesky(h: torch.Tensor, percdamp: float, dead: torch.Tensor | None = None, *,
                            dtype: torch.dtype = torch.float32, layer_shape: tuple[int, int] | None = None):
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = percdamp·mean(diag H); `dead` diagonals set to 1.

    Computed as the reference does (Cholesky, ``cholesky_inverse``, upper Cholesky) in `dtype`.
    Shared by SparseGPT and GPTQ. Returns (U, λ). Raises ValueError, naming the layer, when H is not
    finite or not positive definite even after damping (no silent fallback).
    """
    cols = h.shape[0]
    what = f"the {layer_shape[0]}x{layer_shape[1]} layer" if layer_shape else f"a layer with {cols} inputs"
    h = h.to(dtype=dtype, copy=True)
    if not torch.isfinite(h).all():
        raise ValueError(f"the input Gram matrix of {what} has non-finite entries; check the calibration inputs")
    if dead is not None:
        h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if int(info) != 0:
        raise ValueError(f"the Hessian of {what} is not positive definite after damping "
                         f"λ={float(damp):.3e} (percdamp={percdamp}, {str(dtype).removeprefix('torch.')}); "
                         "raise percdamp (e.g. 0.1)")
    return chol, float(damp)


def block_keep_counts(rows: int, cols: int, blocksize: int, sparsity: float | None = None,
                      keep_total: int | None = None) -> list[int]:
    """Weights kept in each block of columns: ``int(numel·s)`` pruned per block, or `keep_total`
    spread over the blocks in proportion to their width (remainders to the first blocks)."""
    widths = [min(blocksize, cols - i) for i in range(0, cols, blocksize)]
    if (sparsity is None) == (keep_total is None):
        raise ValueError("give exactly one of sparsity, keep_total")
    if sparsity is not None:
        return [rows * w - int(rows * w * sparsity) for w in widths]
    if not 0 <= keep_total <= rows * cols:
        raise ValueError(f"keep_total={keep_total} is not allowed; allowed: 0..{rows * cols}")
    base = [keep_total * w // cols for w in widths]
    for i in range(keep_total - sum(base)):  # fewer than len(widths) left; never overfills a block
        base[i] += 1
    return base


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, keep_counts: list[int] | None = None,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01, *,
                    dtype: torch.dtype = torch.float32):
    """Prune `w` [rows, cols] given the input Gram `h` [cols, cols]. Returns (w_pruned, keep_mask, info).

    Give `keep_counts` (kept entries in each block of `blocksize` columns, unstructured) or
    `nm` = (N, M): keep N of every M consecutive columns per row (`blocksize` a multiple of M).
    `dtype` is the precision of the factorization and the sweep (the reference: fp32).
    """
    rows, cols = w.shape
    if (keep_counts is None) == (nm is None):
        raise ValueError("give exactly one of keep_counts (unstructured) or nm (N:M)")
    n_blocks = -(-cols // blocksize)
    if keep_counts is not None and len(keep_counts) != n_blocks:
        raise ValueError(f"keep_counts has {len(keep_counts)} entries; {cols} columns in blocks of "
                         f"{blocksize} need {n_blocks}")
    if nm is not None and (blocksize % nm[1] or cols % nm[1]):
        raise ValueError(f"N:M with M={nm[1]} needs blocksize={blocksize} and in_features={cols} divisible by M")
    w = w.to(dtype=dtype, copy=True)
    h = h.to(w.device)
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    hinv, damp = damped_inverse_cholesky(h, percdamp, dead, dtype=dtype, layer_shape=(rows, cols))
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    loss = torch.zeros((), dtype=torch.float64, device=w.device)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if nm is None:
            pruned1 = ~matrix_topk_mask(w1 ** 2 / d.unsqueeze(0) ** 2, keep_counts[b])
        else:
            pruned1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                # the group's mask sees the updates of the columns already processed (as the reference)
                score = w1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2
                idx = torch.sort(score, dim=1, stable=True).indices[:, : nm[1] - nm[0]]
                pruned1[:, i:i + nm[1]].scatter_(1, idx, True)
            col = w1[:, i]
            q = col.masked_fill(pruned1[:, i], 0.0)
            e = (col - q) / d[i]
            w1[:, i:] -= torch.outer(e, hinv1[i, i:])
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = pruned1
        loss += (err1.double() ** 2).sum() / 2  # Σ (w − q)² / U_ii² / 2, the reference's `Losses`
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[:, dead] = 0
    mask = ~pruned
    return w * mask, mask, {"damp": damp, "dead_columns": int(dead.sum()), "obs_loss": float(loss)}


# -- handler -------------------------------------------------------------------------------------


@register
class SparseGPT(PruneConfig):
    name: ClassVar[str] = "sparsegpt"
    summary: ClassVar[str] = "OBS pruning with Hessian-based weight updates (unstructured per block, or N:M)"
    accepts_quantized: ClassVar[bool] = False

    blocksize: int = Field(128, ge=1, description="columns per lazy-update block (the unstructured mask is "
                           "chosen per block)")
    percdamp: float = Field(0.01, gt=0, description="damping added to diag(H), as a fraction of its mean")
    precision: Literal["fp32", "fp64"] = Field("fp32", description="precision of the inverse-Hessian Cholesky "
                                                "factor and the sweep (the reference uses fp32)")

    @model_validator(mode="after")
    def _blocks_hold_groups(self):
        nm = parse_pattern(self.pattern)
        if nm and self.blocksize % nm[1]:
            raise ValueError(f"blocksize={self.blocksize} is not allowed for pattern {self.pattern}; "
                             f"allowed: a multiple of M={nm[1]}")
        return self

    def keep_counts(self, spec: LinearSpec) -> list[int]:
        """Kept weights per column block (unstructured): what `apply` will produce, exactly."""
        rows, cols = spec.out_features, spec.in_features
        if self.sparsity is not None:
            return block_keep_counts(rows, cols, self.blocksize, sparsity=self.sparsity)
        values = self._input(spec).a
        total = largest_within(budget_bytes(spec, self.ratio), 0, rows * cols,
                               lambda k: spec.with_terms([SparseSpec(values, k)]).nbytes(), "kept weights")
        return block_keep_counts(rows, cols, self.blocksize, keep_total=total)

    def keep_count(self, spec: LinearSpec) -> int:
        """Kept weights of the whole matrix (SparseGPT's unstructured mask is not per row)."""
        return sum(self.keep_counts(spec))

    def plan(self, spec: LinearSpec) -> LinearSpec:
        if parse_pattern(self.pattern):
            return super().plan(spec)
        dense = self._input(spec)
        return spec.with_terms([SparseSpec(dense.a, self.keep_count(spec))])

    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        self._input(spec)
        (dense,) = layer.terms
        nm = parse_pattern(self.pattern)
        w, mask, info = sparsegpt_prune(dense.weight().to(stats.gram.device), stats.gram,
                                        None if nm else self.keep_counts(spec), nm, self.blocksize,
                                        self.percdamp, dtype=PRECISIONS[self.precision])
        values = as_float(w, dtype_name(dense.a.dtype)).to(dense.a.device)
        return (layer.with_terms([Sparse(values, mask.to(dense.a.device), *self.nm)]),
                {**self.info(mask), **info, "precision": self.precision})
