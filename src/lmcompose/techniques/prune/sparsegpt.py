"""SparseGPT: one-shot OBS pruning with second-order weight updates (Frantar & Alistarh, ICML 2023;
IST-DASLab/sparsegpt, ``SparseGPT.fasterprune``).

Columns are swept left to right in blocks; the error of each pruned weight is spread over the columns not
yet processed through the upper Cholesky factor of the damped H⁻¹ (H = ``Stats.gram``), so the kept
weights compensate. With ``bits`` the same sweep also rounds every column to a grid: joint prune +
quantize, a Sparse term of quantized values whose mask is stored bit-exactly. A block prunes exactly
``int(numel·s)`` entries (the reference prunes one more), so the planned bytes are the saved bytes.

Method notes: docs/methods/sparsegpt.md

Example::

    steps:
      - sparsegpt: {sparsity: 0.5}
      - sparsegpt: {pattern: "2:4", percdamp: 0.01, blocksize: 128}
      - sparsegpt: {sparsity: 0.5, bits: 4, group_size: 128}     # joint prune + quantize
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...algebra.quant import QTensor, QuantSpec, grid_params, quantize_to_grid
from ...algebra.spec import LinearSpec, SparseSpec, TensorSpec
from ...algebra.terms import Sparse, as_float
from ...core.dtypes import dtype_name
from ...core.linalg import PRECISIONS, damped_inverse_cholesky, solver_threads
from ...runtime.linear import CompressedLinear
from ..base import register
from ..budget import budget_bytes, largest_within
from ..fields import ScaleDtype, only_with, setting
from .common import PruneConfig, matrix_topk_mask, parse_pattern

# -- pure functions ------------------------------------------------------------------------------


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


class ColumnGrid:
    """The grid of a sweep that quantizes a [rows, cols] weight one column at a time.

    Per-row grids are fitted up front to `w`; a group's grid is fitted by :meth:`fit` when the sweep
    arrives at its first column. :meth:`round` records a column's codes and returns its grid values.
    """

    def __init__(self, w: torch.Tensor, spec: QuantSpec):
        rows, cols = w.shape
        self.spec, self.g = spec, spec.group_size or cols
        self.scales = torch.empty(rows, spec.n_groups(cols), device=w.device)
        self.zeros = torch.empty_like(self.scales)
        self.codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
        if spec.group_size is None:
            self.scales[:, 0], self.zeros[:, 0] = grid_params(w, spec)

    def starts_group(self, c: int) -> bool:
        """Whether column `c` opens a group whose grid is fitted when the sweep reaches it."""
        return self.spec.group_size is not None and c % self.g == 0

    def fit(self, c: int, group: torch.Tensor, pruned: torch.Tensor):
        """Fit the grid of the group opening at column `c` to `group` (its weights) without the
        entries `pruned` marks (`pruned` may cover only the group's first columns)."""
        group = group.clone()
        # a zero is the same as an excluded entry: every grid spans 0 (xmin <= 0 <= xmax)
        group[:, :pruned.shape[1]].masked_fill_(pruned, 0.0)
        self.scales[:, c // self.g], self.zeros[:, c // self.g] = grid_params(group, self.spec)

    def round(self, c: int, col: torch.Tensor) -> torch.Tensor:
        scale, zero = self.scales[:, c // self.g], self.zeros[:, c // self.g]
        code = quantize_to_grid(col.unsqueeze(1), scale, zero, self.spec.maxq).squeeze(1)
        self.codes[:, c] = code.to(torch.uint8)
        return (scale * (code - zero)).to(col.dtype)

    def qtensor(self) -> QTensor:
        return QTensor(self.codes, self.scales, self.zeros, self.spec)


@solver_threads
def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, keep_counts: list[int] | None = None,
                    nm: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01, *,
                    dtype: torch.dtype = torch.float32, quant: QuantSpec | None = None,
                    grid_from: Literal["swept", "block_start"] = "swept"):
    """Prune `w` [rows, cols] given the input Gram `h` [cols, cols]. Returns (values, keep_mask, info).

    Give `keep_counts` (kept entries in each block of `blocksize` columns, unstructured) or
    `nm` = (N, M): keep N of every M consecutive columns per row (`blocksize` a multiple of M).
    `dtype` is the precision of the factorization and the sweep (the reference: fp32).
    With `quant`, the kept weights are quantized inside the sweep (joint mode) and `values` is a
    QTensor whose dequantized codes, times the mask, are the swept weights; else `values` is the
    pruned weight in `dtype`. `grid_from` says which updates a group's grid sees: all those made so
    far ("swept") or, as the GPTQ reference, those of earlier blocks only ("block_start").
    """
    if grid_from not in ("swept", "block_start"):
        raise ValueError(f"grid_from={grid_from!r} is not allowed; allowed: 'swept', 'block_start'")
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
    grid = ColumnGrid(w, quant) if quant is not None else None
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
            c = i1 + i
            if grid is not None and grid.starts_group(c):
                end = c + grid.g  # `w` holds the updates of earlier blocks only, `w1` this block's too
                if grid_from == "block_start":
                    group = w[:, c:end]
                else:
                    group = torch.cat([w1[:, i:end - i1], w[:, i2:end]], 1)
                grid.fit(c, group, pruned1[:, i:end - i1])
            if nm is not None and i % nm[1] == 0:
                # the group's mask sees the updates of the columns already processed (as the reference)
                score = w1[:, i:i + nm[1]] ** 2 / d[i:i + nm[1]].unsqueeze(0) ** 2
                idx = torch.sort(score, dim=1, stable=True).indices[:, : nm[1] - nm[0]]
                pruned1[:, i:i + nm[1]].scatter_(1, idx, True)
            col = w1[:, i]
            q = col.masked_fill(pruned1[:, i], 0.0)
            if grid is not None:
                q = grid.round(c, q)  # pruned entries stay exactly 0: 0 is on every grid
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
    values = w * mask if grid is None else grid.qtensor()
    return values, mask, {"damp": damp, "dead_columns": int(dead.sum()), "obs_loss": float(loss)}


# -- handler -------------------------------------------------------------------------------------


@register
class SparseGPT(PruneConfig):
    name: ClassVar[str] = "sparsegpt"
    summary: ClassVar[str] = ("OBS pruning with Hessian-based weight updates (unstructured per block, or N:M); "
                              "with `bits`, prunes and quantizes in one sweep")
    accepts_quantized: ClassVar[bool] = False

    blocksize: int = setting("blocksize", doc="columns per lazy-update block (the unstructured mask is chosen "
                             "per block)")
    percdamp: float = setting("percdamp")
    precision: Literal["fp32", "fp64"] = Field("fp32", description="precision of the inverse-Hessian Cholesky "
                                                "factor and the sweep (the reference uses fp32)")
    bits: int | None = setting("bits", None, doc="quantize the kept weights to this many bits inside the sweep "
                               "(joint prune + quantize); None = keep them in the input's float dtype")
    group_size: int | None = setting("group_size", when="with bits")
    symmetric: bool = setting("symmetric", when="with bits")
    scale_dtype: ScaleDtype = setting("scale_dtype", when="with bits")
    grid_from: Literal["swept", "block_start"] = Field(
        "swept", description="with bits and a group_size: a group's grid is fitted to its weights with the "
        "updates of every column swept so far ('swept'), or only those of earlier blocks ('block_start', "
        "GPTQ reference)")

    @model_validator(mode="after")
    def _blocks_hold_groups(self):
        nm = parse_pattern(self.pattern)
        if nm and self.blocksize % nm[1]:
            raise ValueError(f"blocksize={self.blocksize} is not allowed for pattern {self.pattern}; "
                             f"allowed: a multiple of M={nm[1]}")
        only_with(self, ("group_size", "symmetric", "scale_dtype", "grid_from"), self.bits is not None,
                  "needs bits (2..8); without bits sparsegpt does not quantize")
        return self

    def qspec(self) -> QuantSpec | None:
        if self.bits is None:
            return None
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.scale_dtype)

    def _values(self, dense: TensorSpec) -> TensorSpec:
        """What the kept values will be stored as: the input's floats, or codes on the `bits` grid."""
        return dense if self.bits is None else TensorSpec(dense.rows, dense.cols, quant=self.qspec())

    def keep_counts(self, spec: LinearSpec) -> list[int]:
        """Kept weights per column block (unstructured): what `apply` will produce, exactly."""
        rows, cols = spec.out_features, spec.in_features
        if self.sparsity is not None:
            return block_keep_counts(rows, cols, self.blocksize, sparsity=self.sparsity)
        values = self._values(self._input(spec).a)
        total = largest_within(budget_bytes(spec, self.ratio), 0, rows * cols,
                               lambda k: spec.with_terms([SparseSpec(values, k)]).nbytes(), "kept weights")
        return block_keep_counts(rows, cols, self.blocksize, keep_total=total)

    def keep_count(self, spec: LinearSpec) -> int:
        """Kept weights of the whole matrix (SparseGPT's unstructured mask is not per row)."""
        return sum(self.keep_counts(spec))

    def plan(self, spec: LinearSpec) -> LinearSpec:
        dense = self._input(spec)
        if parse_pattern(self.pattern):
            (sparse,) = super().plan(spec).terms
        else:
            sparse = SparseSpec(dense.a, self.keep_count(spec))
        return spec.with_terms([replace(sparse, values=self._values(dense.a))])

    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        self._input(spec)
        (dense,) = layer.terms
        nm = parse_pattern(self.pattern)
        out, mask, info = sparsegpt_prune(dense.weight().to(stats.gram.device), stats.gram,
                                          None if nm else self.keep_counts(spec), nm, self.blocksize,
                                          self.percdamp, dtype=PRECISIONS[self.precision], quant=self.qspec(),
                                          grid_from=self.grid_from)
        values = out if self.bits else as_float(out, dtype_name(dense.a.dtype))
        info = {**self.info(mask), **info, "precision": self.precision}
        if self.bits:
            info.update(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                        grid_from=self.grid_from)
        return layer.with_terms([Sparse(values.to(dense.a.device), mask.to(dense.a.device), *self.nm)]), info
