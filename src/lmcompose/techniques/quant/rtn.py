"""Round-to-nearest (RTN) weight quantization: each group of `group_size` input columns of each row
gets a min-max (or symmetric absmax) grid, and every weight is rounded to its nearest code. The data-free
baseline of GPTQ/AWQ tables.

Method notes: docs/methods/gptq.md

Example::

    steps:
      - rtn: {bits: 4, group_size: 64}
"""

from __future__ import annotations

from typing import ClassVar

from ...algebra.quant import quantize_rtn
from ..base import register
from .common import QuantConfig


@register
class RTN(QuantConfig):
    name: ClassVar[str] = "rtn"
    summary: ClassVar[str] = "round-to-nearest b-bit grid per group of input columns"
    statistic_free: ClassVar[bool] = True
    row_separable: ClassVar[bool] = True

    def quantize_slot(self, w, hessian, mask, bits):
        return quantize_rtn(w, self.qspec(bits))
