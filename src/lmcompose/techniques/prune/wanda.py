"""Wanda: pruning by weights and activations (Sun, Liu, Bair, Kolter; ICLR 2024; locuslab/wanda).

The score of W_ij is |W_ij| · √E[x_j²]; the lowest scores of each output row (or, with ``scope: matrix``,
of the whole matrix) are removed, with no weight update. Mask-only, so it may prune an already quantized
matrix and keep its codes. ``owl: true`` gives decoder blocks with more outliers a lower sparsity (OWL,
Yin et al., 2024), from a dense prepass, at the same mean sparsity.

Method notes: docs/methods/wanda.md

Example::

    steps:
      - wanda: {sparsity: 0.5}                # per output row, unstructured
      - wanda: {pattern: "2:4"}
      - wanda: {ratio: 0.6, scope: matrix}    # 60% of the fp16 bytes, index included
"""

from __future__ import annotations

import logging
from typing import ClassVar, Sequence

import torch
from pydantic import Field, model_validator

from ...algebra.terms import Sparse
from ...runtime.linear import CompressedLinear
from ..base import register
from .common import ScopedPruneConfig

log = logging.getLogger(__name__)


# -- pure functions ------------------------------------------------------------------------------


def wanda_score(w: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """|W| · sqrt(E[x²]) broadcast over rows (the reference's ``|W| * sqrt(scaler_row)``), in fp32."""
    return w.float().abs() * torch.sqrt(sq_mean.to(w.device, torch.float32)).unsqueeze(0)


def outlier_ratio(w: torch.Tensor, sq_mean: torch.Tensor, threshold: float = 5.0) -> float:
    """OWL's outlier ratio of one Linear: fraction of Wanda scores above `threshold` × their mean."""
    return block_outlier_ratio([(w, sq_mean)], threshold)


def block_outlier_ratio(linears: Sequence[tuple[torch.Tensor, torch.Tensor]], threshold: float = 5.0) -> float:
    """OWL's outlier ratio of a decoder block: the scores of all its Linears pooled, one mean for all
    (the reference concatenates the flattened scores before ``check_outlier_mean``)."""
    scores = torch.cat([wanda_score(w, c).flatten().double() for w, c in linears])
    return float((scores > threshold * scores.mean()).double().mean())


def owl_sparsities(ratios: Sequence[float], target: float, lam: float = 0.08) -> list[float]:
    """OWL allocation (Yin et al. 2024, as in their code): min-max normalise the outlier ratios to
    [0, 2λ], centre them on their mean, and subtract from the target sparsity.

    The mean sparsity equals `target`; the spread max − min is 2λ (0 when all ratios are equal); a
    layer with more outliers gets a lower sparsity. Each value lies in [target − 2λ, target + 2λ], and
    in [target − λ, target + λ] only when the normalised ratios are symmetric about their mean.
    """
    if not ratios:
        return []
    if lam < 0:
        raise ValueError(f"owl_lambda={lam!r} is not allowed; allowed: >= 0")
    r = torch.tensor(list(ratios), dtype=torch.float64)
    span = r.max() - r.min()
    scaled = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    out = target - (scaled - scaled.mean())
    if out.min() < 0 or out.max() >= 1:
        raise ValueError(f"OWL sparsities span [{out.min():.3f}, {out.max():.3f}], outside [0, 1); "
                         f"lower owl_lambda={lam} or move the target sparsity={target} away from the edges")
    return out.tolist()


# -- handler -------------------------------------------------------------------------------------


@register
class Wanda(ScopedPruneConfig):
    name: ClassVar[str] = "wanda"
    summary: ClassVar[str] = "prune by |W|·‖x‖ per output row (unstructured or N:M), no weight update"

    owl: bool = Field(False, description="OWL non-uniform sparsity per decoder block from a dense prepass "
                      "(mean sparsity kept; needs `sparsity`, unstructured)")
    owl_threshold: float = Field(5.0, gt=0, description="OWL outlier threshold M: a score is an outlier above "
                                 "M × the block's mean score")
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="OWL spread: block sparsities span 2λ around "
                              "the target")

    @model_validator(mode="after")
    def _owl_needs_a_sparsity(self):
        if self.owl and (self.sparsity is None or self.pattern != "unstructured"):
            raise ValueError(f"owl=True allocates a target `sparsity` across blocks for an unstructured pattern; got "
                             f"sparsity={self.sparsity!r}, ratio={self.ratio!r}, pattern={self.pattern!r}")
        return self

    @property
    def needs_prepass(self) -> bool:
        return self.owl or super().needs_prepass

    def allocate(self, blocks, *, float_dtype: str):
        """OWL: block i gets ``sparsity - (normalised outlier ratio_i - mean)``; the mean stays `sparsity`."""
        if not self.owl:
            return super().allocate(blocks, float_dtype=float_dtype)
        ratios = [block_outlier_ratio([(w, st.sq_mean) for _, w, st in linears], self.owl_threshold)
                  for linears in blocks]
        sparsities = owl_sparsities(ratios, self.sparsity, self.owl_lambda)
        log.info("OWL outlier ratios %s -> sparsities %s", [round(r, 4) for r in ratios],
                 [round(s, 4) for s in sparsities])
        return {name: self.model_copy(update={"sparsity": s, "owl": False})
                for linears, s in zip(blocks, sparsities) for name, _, _ in linears}

    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        self._input(spec)
        (dense,) = layer.terms
        mask = self.select_mask(wanda_score(dense.weight(), stats.sq_mean), spec)
        # mask-only: the stored float values or quantized codes stay as they are
        return layer.with_terms([Sparse(dense.a, mask, *self.nm)]), {**self.info(mask), "scope": self.scope}
