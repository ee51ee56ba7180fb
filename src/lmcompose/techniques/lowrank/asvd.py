"""ASVD: activation-aware SVD (Yuan et al., 2023; hahnyuan/ASVD4LLM).

Input channels are scaled by their activation magnitude before the SVD, so directions that carry large
activations are kept: S = diag(s^α + 1e-6) with s = E|x| ("abs_mean", the reference default), max|x|
("abs_max") or sqrt(E[x²]) ("rms"); W S = U Σ Vᵀ truncated to rank r; V ← V S⁻¹; √Σ on both factors.
The reference uses ``torch.svd_lowrank``; here `solver: exact` (default) is the full SVD and
`solver: randomized` is ``torch.svd_lowrank`` with `oversample` and `niter`. ASVD's sensitivity-based
per-layer rank allocation needs a perplexity sweep over the model per layer and ratio; it is not part
of this technique (each Linear gets the same `ratio`).

Example::

    steps:
      - asvd: {ratio: 0.8, alpha: 0.5}
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from ...registry import register
from .common import LowRankConfig, split_sigma


def asvd_factors(w: torch.Tensor, scale: torch.Tensor, rank: int, alpha: float = 0.5, sigma_split: str = "sqrt",
                 solver: str = "exact", oversample: int = 10, niter: int = 2, generator=None):
    s = scale.to(w.device, torch.float64).clamp_min(0) ** alpha + 1e-6
    ws = w.double() * s.unsqueeze(0)
    if solver == "exact":
        u, sig, vh = torch.linalg.svd(ws, full_matrices=False)
        u, sig, vh = u[:, :rank], sig[:rank], vh[:rank]
    else:
        q = min(rank + oversample, min(ws.shape))
        if generator is not None:  # svd_lowrank draws from the global RNG: fork it to stay side-effect free
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                u, sig, v = torch.svd_lowrank(ws, q=q, niter=niter)
        else:
            u, sig, v = torch.svd_lowrank(ws, q=q, niter=niter)
        u, sig, vh = u[:, :rank], sig[:rank], v[:, :rank].T
    a, b = split_sigma(u, sig, vh / s.unsqueeze(0), sigma_split)
    return a.float(), b.float()


@register
class ASVD(LowRankConfig):
    name: ClassVar[str] = "asvd"
    summary: ClassVar[str] = "SVD of W·diag(s^α), s = activation magnitude per input channel"

    alpha: float = Field(0.5, ge=0.0, description="exponent of the activation scale")
    scaling: Literal["abs_mean", "abs_max", "rms"] = Field("abs_mean", description="per-channel activation statistic")
    solver: Literal["exact", "randomized"] = Field("exact", description="full SVD, or torch.svd_lowrank as the reference")
    oversample: int = Field(10, ge=0, description="randomized solver: extra columns")
    niter: int = Field(2, ge=0, description="randomized solver: power iterations")
    seed: int = Field(0, description="randomized solver: seed of its own generator")

    def factorize(self, w, stats, rank):
        scale = {"abs_mean": stats.abs_mean, "abs_max": stats.absmax, "rms": stats.sq_mean.sqrt()}[self.scaling]
        gen = torch.Generator().manual_seed(self.seed)
        a, b = asvd_factors(w, scale, rank, self.alpha, self.sigma_split, self.solver, self.oversample,
                            self.niter, gen)
        return a, b, {}
