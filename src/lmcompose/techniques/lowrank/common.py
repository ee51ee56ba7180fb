"""What every low-rank technique shares: the rank budget, the Σ split, the typing rule, and the factors.

``ratio`` is the fraction of the Linear's fp16 bytes the factors keep (ASVD's ``param_ratio``; SVD-LLM's
``--ratio 0.2`` means remove 20%, i.e. ``ratio: 0.8`` here). The input must be one float Dense term: a
quantized one is refused unless ``allow_offgrid: true`` (analysis only). `projected_factors` builds the
factors of a truncated W·S as U_kᵀ W, with no inverse of S.

Method notes: docs/methods/lowrank.md
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...algebra.spec import LinearSpec, LowRankSpec, TensorSpec
from ...algebra.terms import LowRank, as_float
from ...core.errors import IllegalStep
from ...runtime.linear import CompressedLinear
from ..base import Technique
from ..budget import budget_bytes, largest_within


def split_sigma(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, how: str = "sqrt"):
    """Factors (A, B) with A B = U diag(s) Vᵀ: √Σ on both (ASVD/SVD-LLM), or Σ all in U or all in V."""
    if how == "sqrt":
        r = s.sqrt()
        return u * r.unsqueeze(0), r.unsqueeze(1) * vh
    if how == "u":
        return u * s.unsqueeze(0), vh
    if how == "v":
        return u, s.unsqueeze(1) * vh
    raise ValueError(f"sigma_split={how!r} is not allowed; allowed: 'sqrt', 'u', 'v'")


def null_tolerance(s: torch.Tensor, shape) -> float:
    """Singular values at or below this are numerically zero (the usual σ₁·max(m, n)·ε rule)."""
    if s.numel() == 0:
        return 0.0
    return float(s.max()) * max(shape) * torch.finfo(s.dtype).eps


def projected_factors(u: torch.Tensor, s: torch.Tensor, w: torch.Tensor, how: str = "sqrt"):
    """(A, B, n_null) with A B = U_k U_kᵀ W, split as U_k Σ_k^½ · Σ_k^-½ U_kᵀ W (or Σ into U / V).

    ``u`` [m, k] are the kept left singular vectors of W·S and ``s`` [k] their singular values; then
    U_kᵀ W = Σ_k V_kᵀ S⁻¹ for any invertible S, so these are the references' factors computed without
    S⁻¹. Directions with σ numerically zero carry nothing through S; they are set to zero (as
    σ·v·S⁻¹ is in the references) and counted in ``n_null``.
    """
    c = u.T @ w                                   # = Σ_k V_kᵀ S⁻¹
    live = s > null_tolerance(s, w.shape)
    inv = torch.where(live, 1.0 / torch.where(live, s, torch.ones_like(s)), torch.zeros_like(s))
    if how == "sqrt":
        a, b = u * s.sqrt().unsqueeze(0), inv.sqrt().unsqueeze(1) * c
    elif how == "u":
        a, b = u * s.unsqueeze(0), inv.unsqueeze(1) * c
    elif how == "v":
        a, b = u * live.to(u.dtype).unsqueeze(0), live.to(c.dtype).unsqueeze(1) * c
    else:
        raise ValueError(f"sigma_split={how!r} is not allowed; allowed: 'sqrt', 'u', 'v'")
    return a, b, int((~live).sum())


class LowRankConfig(Technique):
    """Shared fields: give `rank` or `ratio`; `sigma_split`; `allow_offgrid`; `precision`."""

    family: ClassVar[str] = "lowrank"
    ratio_replaces: ClassVar[tuple[str, ...]] = ("rank",)

    rank: int | None = Field(None, ge=1, description="rank r of U (m×r) V (r×n)")
    ratio: float | None = Field(None, gt=0.0, le=1.0, description="fraction of the Linear's fp16 bytes to keep "
                                "(U and V in the storage dtype); picks the largest rank that fits")
    sigma_split: Literal["sqrt", "u", "v"] = Field("sqrt", description="where Σ goes: √Σ on both factors "
                                                   "(references), or all in U, or all in V")
    allow_offgrid: bool = Field(False, description="allow factorizing a quantized matrix (the factors leave "
                                "the grid; analysis only)")
    precision: Literal["fp32", "fp64"] = Field("fp32", description="dtype of the SVD")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.rank is None) == (self.ratio is None):
            raise ValueError(f"give exactly one of rank, ratio (got rank={self.rank}, ratio={self.ratio})")
        return self

    @property
    def leaves_grid(self) -> bool:
        return self.allow_offgrid

    # -- typing and costing --------------------------------------------------------------------
    def _input(self, spec: LinearSpec):
        a = self.single_dense(spec).a
        if a.quantized and not self.allow_offgrid:
            raise IllegalStep("SVD of a quantized matrix leaves the quantization grid (the factors are on no grid "
                              "and their product is not the quantized matrix); factorize before quantizing, or "
                              "set allow_offgrid: true for analysis only")
        return a

    def float_dtype(self, spec: LinearSpec) -> str:
        """Storage dtype of U and V: the input's float dtype (a quantized input: its scale dtype)."""
        a = self._input(spec)
        return a.quant.scale_dtype if a.quantized else a.dtype

    def spec_for(self, spec: LinearSpec, r: int) -> LinearSpec:
        dtype = self.float_dtype(spec)
        return spec.with_terms([LowRankSpec(TensorSpec(spec.out_features, r, dtype),
                                            TensorSpec(r, spec.in_features, dtype))])

    def resolve_rank(self, spec: LinearSpec) -> int:
        self._input(spec)
        full = min(spec.out_features, spec.in_features)
        if self.ratio is not None:
            return largest_within(budget_bytes(spec, self.ratio), 1, full,
                                  lambda k: self.spec_for(spec, k).nbytes(), "rank")
        r = self.rank
        cost, dense = self.spec_for(spec, r).nbytes(), spec.nbytes()
        if cost > dense:
            raise IllegalStep(f"rank {r} costs {cost} bytes, more than the dense {dense} bytes "
                              f"(break-even rank {self._break_even(spec)})")
        if r > full:
            raise IllegalStep(f"rank {r} exceeds min(out_features, in_features) = {full}")
        return r

    def _break_even(self, spec: LinearSpec) -> int:
        dense, full = spec.nbytes(), min(spec.out_features, spec.in_features)
        if self.spec_for(spec, 1).nbytes() > dense:
            return 0
        return largest_within(dense, 1, full, lambda k: self.spec_for(spec, k).nbytes(), "rank")

    def plan(self, spec: LinearSpec) -> LinearSpec:
        return self.spec_for(spec, self.resolve_rank(spec))

    # -- the work ------------------------------------------------------------------------------
    def factorize(self, w: torch.Tensor, stats, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(A [m, r], B [r, n], info) with A B ≈ W: the technique's math, on W's device."""
        raise NotImplementedError

    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        rank = self.resolve_rank(spec)
        dtype = self.float_dtype(spec)
        (dense,) = layer.terms
        w = dense.weight(torch.float32)
        device = w.device
        if stats is not None:  # None: a statistic-free factorization without calibration (plain SVD)
            w = w.to(stats.gram.device)
        a, b, info = self.factorize(w, stats, rank)
        new = layer.with_terms([LowRank(as_float(a, dtype).to(device), as_float(b, dtype).to(device))])
        return new, {"rank": rank, "ratio": new.spec().nbytes() / spec.dense_fp16_nbytes(), **info}
