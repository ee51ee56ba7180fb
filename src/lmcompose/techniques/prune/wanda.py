"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter; ICLR 2024; locuslab/wanda).

The score of weight W_ij is |W_ij| · ‖X_j‖₂, i.e. |W_ij| · sqrt(E[x_j²]) up to a constant per layer;
weights are compared within each output row (the paper's choice; ``scope: matrix`` compares over the
whole matrix) and the lowest scores are removed, with no weight update. N:M keeps the N best of every
M consecutive inputs. Mask-only, so it may prune an already quantized matrix and keep its codes.

OWL (Yin et al., 2024) non-uniform layer sparsity needs every layer's outlier ratio before the first
layer is pruned, i.e. a model-level prepass the sequential pipeline does not have yet;
:func:`owl_sparsities` and :func:`outlier_ratio` implement its allocation rule for that prepass.

Example::

    steps:
      - wanda: {sparsity: 0.5}
      - wanda: {pattern: "2:4"}
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ...algebra.linear import CompressedLinear
from ...algebra.terms import Sparse
from ...registry import register
from .common import ScopedPruneConfig


def wanda_score(w: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """|W| · sqrt(E[x²]) broadcast over rows (the reference's `|W| * sqrt(scaler_row)`)."""
    return w.abs() * torch.sqrt(sq_mean.to(w.device, torch.float32)).unsqueeze(0)


def outlier_ratio(w: torch.Tensor, sq_mean: torch.Tensor, threshold: float = 5.0) -> float:
    """OWL's layer outlier ratio: fraction of Wanda scores above `threshold` × their mean."""
    score = wanda_score(w, sq_mean)
    return float((score > threshold * score.mean()).float().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """OWL allocation: layers with more outliers get lower sparsity, within target ± lam, mean = target."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = r.max() - r.min()
    scaled = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    sparsity = 1.0 - (1.0 - target + scaled - scaled.mean())  # higher outlier ratio -> keep more
    return sparsity.tolist()


@register
class Wanda(ScopedPruneConfig):
    name: ClassVar[str] = "wanda"
    summary: ClassVar[str] = "prune by |W|·‖x‖ per output row (unstructured or N:M), no weight update"

    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        self._input(spec)
        (dense,) = layer.terms
        mask = self.select_mask(wanda_score(dense.weight(), stats.sq_mean), spec)
        return layer.with_terms([Sparse(dense.a, mask, *self.nm)]), self.info(mask)
