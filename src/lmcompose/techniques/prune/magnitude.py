"""Magnitude pruning: remove the weights of smallest |W|.

The data-free baseline of every pruning paper (e.g. Han et al., 2015; the `magnitude` rows of the
Wanda and SparseGPT tables). Mask-only, so it may also prune an already quantized matrix and keep
its codes (quantize → prune).

Method notes: docs/methods/wanda.md

Example::

    steps:
      - magnitude: {sparsity: 0.5}            # per matrix, unstructured
      - magnitude: {pattern: "2:4"}
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ...algebra.terms import Sparse
from ...runtime.linear import CompressedLinear
from ..base import register
from .common import ScopedPruneConfig


def magnitude_score(w):
    return w.abs()


@register
class Magnitude(ScopedPruneConfig):
    name: ClassVar[str] = "magnitude"
    summary: ClassVar[str] = "prune the smallest |W| (unstructured per matrix or row, or N:M)"
    statistic_free: ClassVar[bool] = True

    scope: Literal["row", "matrix"] = Field("matrix", description="compare scores per output 'row' or per 'matrix'")

    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        self._input(spec)
        (dense,) = layer.terms
        mask = self.select_mask(magnitude_score(dense.weight()), spec)
        return layer.with_terms([Sparse(dense.a, mask, *self.nm)]), self.info(mask)
