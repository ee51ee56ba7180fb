"""ASVD: activation-aware SVD (Yuan et al., 2023, arXiv 2312.05821; hahnyuan/ASVD4LLM).

Input channel j is scaled by s_j = stat_j^α + 1e-6 (stat: E|x|, max|x| or √E[x²]) before the SVD, so the
few channels that carry most of the activation magnitude count more; W·S is truncated to rank r and
mapped back through S⁻¹ (the diagonal approximation of the layer objective; `svdllm` solves the full one).
The SVD is exact by default; ``solver: randomized, oversample: 0, niter: 2`` is the reference's solver.

Method notes: docs/methods/lowrank.md

Example::

    steps:
      - asvd: {ratio: 0.8}                                  # alpha 0.5, abs_mean, exact SVD
      - asvd: {ratio: 0.8, solver: randomized, oversample: 0, niter: 2}   # the reference's solver
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from ...core.linalg import PRECISIONS, randomized_svd
from ..base import register
from .common import LowRankConfig, projected_factors


def asvd_scale(stat: torch.Tensor, alpha: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """The reference's diagonal s = stat^α + eps (stat ≥ 0)."""
    return stat.clamp_min(0) ** alpha + eps


def asvd_factors(w: torch.Tensor, stat: torch.Tensor, rank: int, alpha: float = 0.5, sigma_split: str = "sqrt",
                 solver: str = "exact", oversample: int = 0, niter: int = 2,
                 generator: torch.Generator | None = None, eps: float = 1e-6, dtype=torch.float32):
    """(A [m, r], B [r, n]) with A B = the rank-r truncation of W·diag(s) mapped back by diag(s)⁻¹."""
    w = w.to(dtype)
    s = asvd_scale(stat.to(w.device, dtype), alpha, eps)
    ws = w * s.unsqueeze(0)
    if solver == "exact":
        u, sig, _ = torch.linalg.svd(ws, full_matrices=False)
    elif solver == "randomized":
        u, sig = randomized_svd(ws, min(rank + oversample, *ws.shape), niter, generator)
    else:
        raise ValueError(f"solver={solver!r} is not allowed; allowed: 'exact', 'randomized'")
    a, b, _ = projected_factors(u[:, :rank], sig[:rank], w, sigma_split)
    return a, b


@register
class ASVD(LowRankConfig):
    name: ClassVar[str] = "asvd"
    summary: ClassVar[str] = "SVD of W·diag(s^α), s = activation magnitude per input channel"

    alpha: float = Field(0.5, ge=0.0, description="exponent of the activation statistic (reference 0.5)")
    scaling: Literal["abs_mean", "abs_max", "rms"] = Field(
        "abs_mean", description="per-channel statistic: E|x| (reference default), max|x|, or sqrt(E[x²])")
    eps: float = Field(1e-6, ge=0.0, description="added to stat^α (reference 1e-6)")
    solver: Literal["exact", "randomized"] = Field(
        "exact", description="full SVD, or randomized (torch.svd_lowrank's algorithm, as the reference)")
    oversample: int = Field(0, ge=0, description="randomized: extra basis columns (reference 0)")
    niter: int = Field(2, ge=0, description="randomized: power iterations (reference 2)")
    seed: int = Field(0, description="randomized: seed of its own generator")

    def factorize(self, w, stats, rank):
        stat = {"abs_mean": stats.abs_mean, "abs_max": stats.absmax, "rms": stats.sq_mean.clamp_min(0).sqrt()}
        gen = None
        if self.solver == "randomized":
            gen = torch.Generator(device=w.device).manual_seed(self.seed)
        a, b = asvd_factors(w, stat[self.scaling], rank, self.alpha, self.sigma_split, self.solver,
                            self.oversample, self.niter, gen, self.eps, PRECISIONS[self.precision])
        return a, b, {"solver": self.solver, "scaling": self.scaling, "alpha": self.alpha}
