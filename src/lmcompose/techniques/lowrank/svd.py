"""Plain truncated SVD: W ≈ U_r Σ_r V_rᵀ, optimal in Frobenius norm and blind to the data. The
baseline of the SVD-LLM and ASVD tables (it collapses on LLMs: LANDSCAPE §4.2).

Example::

    steps:
      - svd: {ratio: 0.8}      # keep 80% of the fp16 bytes
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ...registry import register
from .common import LowRankConfig, split_sigma


def truncated_svd(w: torch.Tensor, rank: int, sigma_split: str = "sqrt"):
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    a, b = split_sigma(u[:, :rank], s[:rank], vh[:rank], sigma_split)
    return a.float(), b.float(), s


@register
class SVD(LowRankConfig):
    name: ClassVar[str] = "svd"
    summary: ClassVar[str] = "truncated SVD of W (data-free)"

    def factorize(self, w, stats, rank):
        a, b, s = truncated_svd(w, rank, self.sigma_split)
        return a, b, {"discarded_energy": float((s[rank:] ** 2).sum() / (s ** 2).sum())}
