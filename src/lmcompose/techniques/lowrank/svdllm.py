"""SVD-LLM: truncation-aware data whitening (Wang et al., ICLR 2025; AIoT-MLSys-Lab/SVD-LLM).

With G = E[x xᵀ] = L Lᵀ (Cholesky), the layer error ‖(W − Ŵ)X‖² equals ‖(W − Ŵ)L‖²_F, so truncating
the SVD of W L discards exactly the squared singular values it drops: truncation becomes loss-optimal.
Factors: W_u = U_k Σ_k^{1/2}, W_v = Σ_k^{1/2} V_kᵀ L⁻¹ (a triangular solve, not an inverse). The
reference accumulates the unnormalized Σ XᵀX; G here is its mean, which scales L by a constant and
changes neither the truncation nor the factors.

A Gram that is not positive definite (dead input channels, fewer tokens than channels) gets an
explicit, recorded regularisation: `eig_shift` (the reference: add (−λ_min + eps·mean diag G)·I only
when Cholesky fails) or `damp` (always add damp·mean(diag G)·I). The amount added is in the report.

Example::

    steps:
      - svdllm: {ratio: 0.8}
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from ...registry import register
from .common import LowRankConfig, split_sigma


def whitening_factor(gram: torch.Tensor, regularization: str = "eig_shift", eps: float = 1e-6,
                     damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor L of G (+ the recorded regularisation). Returns (L, amount added)."""
    g = gram.double()
    g = (g + g.T) / 2
    scale = float(g.diagonal().mean()) or 1.0
    added = 0.0
    if regularization == "damp":
        added = damp * scale
        g = g + added * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(g)
    if info.item() != 0:
        if regularization != "eig_shift":
            raise ValueError(f"Gram matrix not positive definite after damp={damp}; raise damp")
        lam_min = float(torch.linalg.eigvalsh(g)[0])
        shift = -lam_min + eps * scale
        added += shift
        chol = torch.linalg.cholesky(g + shift * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
    return chol, added


def svdllm_factors(w: torch.Tensor, chol: torch.Tensor, rank: int, sigma_split: str = "sqrt"):
    """(A, B, singular values of W L) with A B the rank-`rank` whitened truncation of W."""
    u, s, vh = torch.linalg.svd(w.double() @ chol, full_matrices=False)
    vh_unwhite = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)  # Vᵀ L⁻¹
    a, b = split_sigma(u[:, :rank], s[:rank], vh_unwhite, sigma_split)
    return a.float(), b.float(), s


@register
class SVDLLM(LowRankConfig):
    name: ClassVar[str] = "svdllm"
    summary: ClassVar[str] = "SVD of W·chol(E[xxᵀ]) (whitened, truncation-aware), factors mapped back"

    regularization: Literal["eig_shift", "damp"] = Field(
        "eig_shift", description="for a Gram that is not positive definite: shift by −λ_min + eps·mean(diag) "
        "when Cholesky fails (reference), or always add damp·mean(diag)")
    eps: float = Field(1e-6, gt=0, description="eig_shift margin, relative to mean(diag G)")
    damp: float = Field(0.01, gt=0, description="damp amount, relative to mean(diag G)")

    def factorize(self, w, stats, rank):
        chol, added = whitening_factor(stats.gram, self.regularization, self.eps, self.damp)
        a, b, s = svdllm_factors(w, chol, rank, self.sigma_split)
        return a, b, {"regularization_added": added,
                      "discarded_whitened_energy": float((s[rank:] ** 2).sum() / (s ** 2).sum())}
