"""What every low-rank technique shares: the rank budget, the Σ split, and the typing rule.

Rank r costs U (m×r) + V (r×n) in the float storage dtype; `ratio` picks the largest r whose bytes fit
``ratio`` × the Linear's fp16 bytes, through the algebra's own byte count. A rank that would cost more
than the dense matrix is refused at ``Recipe.check``. SVD of an already quantized matrix leaves the
grid and is not deployable (DESIGN §2): it is refused unless `allow_offgrid: true` (analysis only).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...algebra.linear import CompressedLinear
from ...algebra.spec import LinearSpec, LowRankSpec, TensorSpec
from ...algebra.terms import LowRank, as_float
from ...registry import IllegalStep, Technique
from ..budget import budget_bytes, largest_within


def split_sigma(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, how: str = "sqrt"):
    """Factors (A, B) with A B = U diag(s) Vᴴ: √Σ on both (ASVD/SVD-LLM), or Σ all in U or all in V."""
    if how == "sqrt":
        r = s.sqrt()
        return u * r.unsqueeze(0), r.unsqueeze(1) * vh
    if how == "u":
        return u * s.unsqueeze(0), vh
    return u, s.unsqueeze(1) * vh


class LowRankConfig(Technique):
    family: ClassVar[str] = "lowrank"

    rank: int | None = Field(None, ge=1, description="rank r of U (m×r) V (r×n)")
    ratio: float | None = Field(None, gt=0.0, le=1.0, description="fraction of the Linear's fp16 bytes to keep "
                                "(U and V); picks the largest rank that fits")
    sigma_split: Literal["sqrt", "u", "v"] = Field("sqrt", description="where Σ goes: √Σ on both factors, or all in U or V")
    allow_offgrid: bool = Field(False, description="allow factorizing a quantized matrix (leaves the grid; analysis only)")

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.rank is None) == (self.ratio is None):
            raise ValueError(f"give exactly one of rank={self.rank} and ratio={self.ratio}")
        return self

    def _spec_for(self, spec: LinearSpec, r: int) -> LinearSpec:
        dtype = spec.terms[0].a.dtype if not spec.terms[0].a.quantized else "fp16"
        return spec.with_terms([LowRankSpec(TensorSpec(spec.out_features, r, dtype),
                                            TensorSpec(r, spec.in_features, dtype))])

    def resolve_rank(self, spec: LinearSpec) -> int:
        if spec.kinds() != ("dense",):
            raise IllegalStep(f"low-rank factorization takes a single dense term, got {spec.describe()}")
        if spec.terms[0].a.quantized and not self.allow_offgrid:
            raise IllegalStep("SVD of a quantized matrix leaves the quantization grid (not deployable); factorize "
                              "first and quantize the factors, use a residual method, or set allow_offgrid: true")
        full = min(spec.out_features, spec.in_features)
        if self.rank is not None:
            r = self.rank
            if r > full:
                raise IllegalStep(f"rank {r} exceeds min(m, n) = {full}")
        else:
            r = largest_within(budget_bytes(spec, self.ratio), 0, full,
                               lambda k: self._spec_for(spec, k).nbytes(), "rank")
            if r == 0:
                raise IllegalStep(f"ratio={self.ratio} leaves no room for rank 1")
        cost, dense = self._spec_for(spec, r).nbytes(), spec.nbytes()
        if cost > dense:
            raise IllegalStep(f"rank {r} costs {cost} bytes, more than the dense matrix's {dense} bytes")
        return r

    def plan(self, spec: LinearSpec) -> LinearSpec:
        return self._spec_for(spec, self.resolve_rank(spec))

    def factorize(self, w: torch.Tensor, stats, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(A [m, r], B [r, n], info) with A B ≈ W: the technique's math."""
        raise NotImplementedError

    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        rank = self.resolve_rank(spec)
        (dense,) = layer.terms
        dtype = "fp16" if spec.terms[0].a.quantized else spec.terms[0].a.dtype
        a, b, info = self.factorize(dense.weight().to(stats.gram.device), stats, rank)
        device = dense.weight().device
        term = LowRank(as_float(a, dtype).to(device), as_float(b, dtype).to(device))
        new = layer.with_terms([term])
        return new, {"rank": rank, "ratio": new.spec().nbytes() / spec.dense_fp16_nbytes(), **info}
