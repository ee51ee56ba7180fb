"""SVD-LLM: truncation-aware data whitening (Wang et al., ICLR 2025, arXiv 2403.07378; AIoT-MLSys-Lab/SVD-LLM).

With S = chol(G), G the input Gram, the layer error of Ŵ is ‖(W − Ŵ)S‖²_F, so truncating the SVD of W S
is optimal for the layer objective (Eckart–Young). The factors are built from U_kᵀ W, with no inverse of
S; a Gram that is not positive definite gets an explicit regularisation (`regularization`), recorded in
the step's info.

Method notes: docs/methods/lowrank.md

Example::

    steps:
      - svdllm: {ratio: 0.8}             # SVD-LLM "20% compression" (their --ratio 0.2 = remove 20%)
      - gptq: {bits: 4, group_size: 128, target: lowrank}   # SVD-LLM + GPTQ (L→Q)
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from ...core.linalg import PRECISIONS
from ..base import register
from .common import LowRankConfig, projected_factors


def whitening_factor(gram: torch.Tensor, regularization: str = "eig_shift", eps: float = 1e-6,
                     damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """(S, added): the lower Cholesky factor S of G + added·I in fp64, and the amount added (0 if none).

    Memory (n = G's width): the fp64 copy of G and its factor, 2·8n² bytes beside G (1.9 GB at n = 11008);
    the shift goes onto the copy's diagonal in place, with no identity matrix.
    """
    if torch.equal(gram, gram.mT):  # the Grams of `core.stats` are symmetric by construction
        g = gram.to(torch.float64, copy=True)
    else:
        g = gram.to(torch.float64)
        g = (g + g.mT) / 2
    mean_diag = float(g.diagonal().mean())
    unit = mean_diag if mean_diag > 0 else 1.0
    added = 0.0
    if regularization == "damp":
        added = damp * unit
        g.diagonal().add_(added)
    elif regularization != "eig_shift":
        raise ValueError(f"regularization={regularization!r} is not allowed; allowed: 'eig_shift', 'damp'")
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0 and regularization == "eig_shift":
        del chol
        lam_min = float(torch.linalg.eigvalsh(g)[0])
        added = -lam_min + eps * unit
        g.diagonal().add_(added)
        chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        field = "eps" if regularization == "eig_shift" else "damp"
        raise ValueError(f"the input Gram is not positive definite even after adding {added:.3g}·I "
                         f"(regularization={regularization!r}); raise {field}")
    return chol, added


def svdllm_factors(w: torch.Tensor, chol: torch.Tensor, rank: int, sigma_split: str = "sqrt",
                   dtype=torch.float32):
    """(A [m, k], B [k, n], singular values of W S) with A B the rank-k whitened truncation of W.

    Layer error: tr((W − A B) S Sᵀ (W − A B)ᵀ) = Σ_{i>k} σ_i² exactly (in exact arithmetic).
    """
    w = w.to(dtype)
    u, s, _ = torch.linalg.svd(w @ chol.to(w.device, dtype), full_matrices=False)
    a, b, _ = projected_factors(u[:, :rank], s[:rank], w, sigma_split)
    return a, b, s


@register
class SVDLLM(LowRankConfig):
    name: ClassVar[str] = "svdllm"
    summary: ClassVar[str] = "SVD of W·chol(E[xxᵀ]) (whitened: truncation optimal for the layer error)"

    precision: Literal["fp32", "fp64"] = Field("fp32", description="dtype of the SVD of W·S, as the reference "
                                               "(the Cholesky is always fp64)")
    regularization: Literal["eig_shift", "damp"] = Field(
        "eig_shift", description="Gram not positive definite: add (−λ_min + eps·mean diag)·I only when the "
        "Cholesky fails (reference), or always add damp·mean(diag)·I")
    eps: float = Field(1e-6, gt=0, description="eig_shift margin, relative to mean(diag G)")
    damp: float = Field(0.01, gt=0, description="damp amount, relative to mean(diag G)")

    def factorize(self, w, stats, rank):
        chol, added = whitening_factor(stats.gram, self.regularization, self.eps, self.damp)
        dtype = PRECISIONS[self.precision]
        chol = chol.to(dtype)  # the fp64 factor is freed before the SVD when the SVD runs in fp32
        a, b, s = svdllm_factors(w, chol, rank, self.sigma_split, dtype)
        energy = s.double() ** 2
        mean_diag = float(stats.gram.diagonal().double().mean())
        return a, b, {
            "regularization": self.regularization, "regularization_added": added,
            "regularization_relative": added / mean_diag if mean_diag > 0 else added,
            "discarded_whitened_energy": float(energy[rank:].sum() / energy.sum()) if energy.sum() > 0 else 0.0}
