"""SparseGPT: one-shot OBS pruning with second-order weight updates (Frantar & Alistarh, ICML 2023;
IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``).

Columns are processed left to right in blocks. For each column the pruned weights (mask chosen by
w² / [H⁻¹]_jj²) are set to zero and the error is spread over the not-yet-processed columns through
the upper Cholesky factor of the damped inverse Hessian, with lazy block updates. Unstructured masks
are chosen per block of `blocksize` columns over all rows (the reference's adaptive mask); N:M masks
per row inside each group of M columns, decided when the sweep reaches the group.

Differences from the reference, kept on purpose: the reference prunes every entry ``<=`` the score at
index ``int(numel·s)`` of a block (one more than ``s`` of the block when scores are distinct); here a
block prunes exactly ``int(numel·s)`` entries (or the count a byte `ratio` allows), so the bytes that
``Recipe.check`` predicts are the bytes produced.

Example::

    steps:
      - sparsegpt: {sparsity: 0.5}
      - sparsegpt: {pattern: "2:4", percdamp: 0.01, blocksize: 128}
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator

from ...algebra.linear import CompressedLinear
from ...algebra.spec import LinearSpec, SparseSpec
from ...algebra.terms import Sparse, as_float
from ...algebra.quant import dtype_name
from ...registry import register
from ..budget import budget_bytes, largest_within
from .common import PruneConfig, parse_pattern


def damped_inverse_cholesky(h: torch.Tensor, percdamp: float, dead: torch.Tensor | None = None):
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp·mean(diag H); dead diagonals set to 1.

    Shared by SparseGPT and GPTQ. Returns (U, λ). Raises ValueError when H is not positive definite
    even after damping.
    """
    h = h.clone().float()
    if dead is not None:
        h[dead, dead] = 1.0
    damp = percdamp * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        chol, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    if info.item() != 0:
        raise ValueError(f"the {h.shape[0]}x{h.shape[0]} Hessian is not positive definite after damping "
                         f"{damp.item():.3e} (percdamp={percdamp}); raise percdamp (e.g. 0.1)")
    return chol, float(damp)


def block_keep_counts(rows: int, cols: int, blocksize: int, sparsity: float | None = None,
                      keep_total: int | None = None) -> list[int]:
    """Weights kept in each block of columns: int(numel·s) pruned per block, or `keep_total` spread
    over the blocks in proportion to their width (remainders to the first blocks)."""
    widths = [min(blocksize, cols - i) for i in range(0, cols, blocksize)]
    if sparsity is not None:
        return [rows * w - int(rows * w * sparsity) for w in widths]
    base = [keep_total * w // cols for w in widths]
    for i in range(keep_total - sum(base)):
        base[i % len(base)] += 1
    return [min(b, rows * w) for b, w in zip(base, widths)]


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, keep_counts: list[int] | None = None,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01):
    """Prune `w` [rows, cols] given the input Gram `h` [cols, cols]. Returns (w_pruned, mask, info).

    Either `keep_counts` (kept entries per column block, unstructured) or `nm` = (N, M): keep N of M.
    """
    w = w.clone().float()
    h = h.to(w.device, torch.float32)
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    w[:, dead] = 0
    hinv, damp = damped_inverse_cholesky(h, percdamp, dead)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)  # True = kept
    loss = torch.zeros(rows, device=w.device)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if nm is None:
            score = w1 ** 2 / d.unsqueeze(0) ** 2
            prune = score.numel() - keep_counts[b]
            pruned1 = torch.zeros_like(w1, dtype=torch.bool)
            if prune > 0:
                pruned1.view(-1)[torch.topk(score.flatten(), prune, largest=False).indices] = True
        else:
            pruned1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, i]
            if nm is not None and i % nm[1] == 0:
                score = w1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2
                idx = torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices
                pruned1.scatter_(1, i + idx, True)
            q = col.clone()
            q[pruned1[:, i]] = 0
            q1[:, i] = q
            e = (col - q) / d[i]
            loss += (col - q) ** 2 / d[i] ** 2 / 2
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        mask[:, i1:i2] = ~pruned1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    # Dead columns were zeroed before the sweep, so their score is 0 and they are pruned first; any
    # that stay in the mask (N:M) hold exact zeros and the byte count stays what the plan said.
    return w * mask, mask, {"damp": damp, "dead_columns": int(dead.sum()), "obs_loss": float(loss.sum())}


@register
class SparseGPT(PruneConfig):
    name: ClassVar[str] = "sparsegpt"
    summary: ClassVar[str] = "OBS pruning with Hessian-based weight updates (unstructured per block, or N:M)"
    accepts_quantized: ClassVar[bool] = False

    blocksize: int = Field(128, ge=1, description="columns per lazy-update block (the mask is chosen per block)")
    percdamp: float = Field(0.01, gt=0, description="damping added to diag(H), as a fraction of its mean")

    @model_validator(mode="after")
    def _blocks_hold_groups(self):
        nm = parse_pattern(self.pattern)
        if nm and self.blocksize % nm[1]:
            raise ValueError(f"blocksize={self.blocksize} must be a multiple of M={nm[1]} for pattern {self.pattern}")
        return self

    def keep_counts(self, spec: LinearSpec) -> list[int]:
        rows, cols = spec.out_features, spec.in_features
        if self.sparsity is not None:
            return block_keep_counts(rows, cols, self.blocksize, sparsity=self.sparsity)
        values = self._input(spec).a
        total = largest_within(budget_bytes(spec, self.ratio), 0, rows * cols,
                               lambda k: spec.with_terms([SparseSpec(values, k)]).nbytes(), "kept weights")
        return block_keep_counts(rows, cols, self.blocksize, keep_total=total)

    def plan(self, spec: LinearSpec) -> LinearSpec:
        if parse_pattern(self.pattern):
            return super().plan(spec)
        dense = self._input(spec)
        return spec.with_terms([SparseSpec(dense.a, sum(self.keep_counts(spec)))])

    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        self._input(spec)
        (dense,) = layer.terms
        nm = parse_pattern(self.pattern)
        w, mask, info = sparsegpt_prune(dense.weight().to(stats.gram.device), stats.gram,
                                        None if nm else self.keep_counts(spec), nm, self.blocksize, self.percdamp)
        values = as_float(w, dtype_name(dense.a.dtype)).to(dense.a.device)
        return layer.with_terms([Sparse(values, mask.to(dense.a.device), *self.nm)]), {**self.info(mask), **info}
