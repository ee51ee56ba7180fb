"""ASVD: activation-aware SVD (Yuan et al., 2023, arXiv 2312.05821; hahnyuan/ASVD4LLM).

Idea: plain SVD treats every input channel alike, but a few channels carry most of the activation
magnitude. ASVD scales input channel j by s_j = stat_j^α + 1e-6 before the SVD (the reference adds
the 1e-6 after the power: ``scaling_diag_matrix ** alpha`` then ``+= 1e-6``, modules/svd_linear.py),
truncates W·S = U Σ Vᵀ to rank r and maps back, V ← S⁻¹ V, with √Σ on both factors (the reference's
``sigma_fuse="UV"``). stat is E|x| (``scaling: abs_mean``, the reference default), max|x|
(``abs_max``) or √E[x²] (``rms``). Because S is diagonal this is the diagonal approximation of the
layer objective tr(ΔW H ΔWᵀ); `svdllm` solves the full one. The mapped-back product is computed as
U_k U_kᵀ W (equal to U_k Σ_k V_kᵀ S⁻¹, see ``common.py``).

Solver: the reference calls ``torch.svd_lowrank(W S, q=rank)`` (randomized, niter=2, no
oversampling). Here ``solver: exact`` (default) is the full ``torch.linalg.svd`` — the truncation
the method intends, deterministic; ``solver: randomized`` is the same Halko et al. range finder as
``torch.svd_lowrank`` (q = rank + `oversample`, `niter` power iterations with QR re-orthogonalisation)
but drawing from its own ``torch.Generator`` seeded by `seed` (``torch.svd_lowrank`` can only use
the global RNG). ``oversample: 0, niter: 2`` is the reference.

The reference's rank statistic differs by a constant: it sums per-batch means (n_batches × E|x|);
a uniform scale of S changes neither the truncation nor the factors, only where the 1e-6 lands.

Not here: ASVD's sensitivity-based per-layer rank allocation (a calibration-perplexity sweep for every
Linear × candidate ratio, then a binary search on the sorted list) needs full-model evaluations, not
one Linear and its statistics; every targeted Linear gets the same `rank`/`ratio`.

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
