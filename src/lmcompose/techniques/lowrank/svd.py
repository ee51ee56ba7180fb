"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ (Eckart–Young; the "SVD" baseline of the ASVD and SVD-LLM tables).

The best rank-r approximation in Frobenius norm, but blind to the data: it minimises ‖ΔW‖_F, not the
layer output error ‖ΔW X‖_F, and collapses on LLMs whose inputs have outlier channels. Use it as the
data-free baseline; `asvd` and `svdllm` fix the objective.

Method notes: docs/methods/lowrank.md

Example::

    steps:
      - svd: {ratio: 0.8}                  # keep 80% of the fp16 bytes (U and V in fp16)
      - svd: {rank: 64, sigma_split: u, precision: fp64}
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ...core.linalg import PRECISIONS
from ..base import register
from .common import LowRankConfig, split_sigma


def truncated_svd(w: torch.Tensor, rank: int, sigma_split: str = "sqrt", dtype=torch.float32):
    """(A [m, r], B [r, n], all singular values of W) with A B the rank-r truncated SVD of W."""
    u, s, vh = torch.linalg.svd(w.to(dtype), full_matrices=False)
    a, b = split_sigma(u[:, :rank], s[:rank], vh[:rank], sigma_split)
    return a, b, s


@register
class SVD(LowRankConfig):
    name: ClassVar[str] = "svd"
    summary: ClassVar[str] = "truncated SVD of W (data-free; Frobenius-optimal)"
    statistic_free: ClassVar[bool] = True

    def factorize(self, w, stats, rank):
        a, b, s = truncated_svd(w, rank, self.sigma_split, PRECISIONS[self.precision])
        energy = s.double() ** 2
        return a, b, {"discarded_energy": float(energy[rank:].sum() / energy.sum()) if energy.sum() > 0 else 0.0}
