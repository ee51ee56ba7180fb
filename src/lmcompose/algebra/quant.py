"""Uniform integer quantization of a weight matrix: the grid, RTN, and the stored form.

The grid is the one of GPTQ's ``Quantizer`` (IST-DASLab/gptq, quant.py), so that RTN, GPTQ and every
technique that quantizes a factor share one definition of "a b-bit tensor":

* asymmetric: ``xmin = min(w, 0)``, ``xmax = max(w, 0)`` over the group, ``scale = (xmax - xmin) / maxq``,
  ``zero = round(-xmin / scale)``, stored as a ``bits``-bit integer;
* symmetric: ``xmax = max|w|``, ``scale = 2 xmax / maxq``, ``zero = (maxq + 1) / 2`` (a constant, not stored);
* ``code = clamp(round(w / scale) + zero, 0, maxq)``; ``w_hat = scale * (code - zero)``.

Groups run over input columns (``group_size`` columns per scale; ``None`` means one group per row). A
width that ``group_size`` does not divide ends with a shorter group, counted exactly. With act-order
(GPTQ), groups are formed over a column permutation ``perm`` that is stored with the tensor.

Scales are rounded to ``scale_dtype`` (fp16 by default) *before* codes are chosen, so the codes are the
best ones for the scales that are actually stored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..core.dtypes import FLOAT_BYTES, FLOAT_DTYPES
from .packing import pack_bits, packed_nbytes, unpack_bits


@dataclass(frozen=True)
class QuantSpec:
    """How a tensor is quantized. Validated at construction."""

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = False
    scale_dtype: str = "fp16"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is not allowed; allowed: integers 2..8")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} is not allowed; allowed: a positive integer or None (per row)")
        if self.scale_dtype not in FLOAT_BYTES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r} is not allowed; allowed: {sorted(FLOAT_BYTES)}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, cols: int) -> int:
        g = self.group_size or cols
        return -(-cols // g)

    def to_dict(self) -> dict:
        return asdict(self)


def perm_nbytes(cols: int) -> int:
    """Bytes of a stored column permutation (int16 when it fits, else int32)."""
    return cols * (2 if cols <= 32767 else 4)


def quantized_nbytes(rows: int, cols: int, spec: QuantSpec, count: int | None = None, perm: bool = False) -> int:
    """Exact stored bytes of a quantized [rows, cols] tensor holding `count` codes (default all)."""
    count = rows * cols if count is None else count
    groups = rows * spec.n_groups(cols)
    total = packed_nbytes(count, spec.bits) + groups * FLOAT_BYTES[spec.scale_dtype]
    if not spec.symmetric:
        total += packed_nbytes(groups, spec.bits)
    if perm:
        total += perm_nbytes(cols)
    return total


def grid_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` ([rows, k], one group), as in GPTQ's ``find_params``.

    Returns fp32 tensors of shape [rows]; the scale is already rounded to ``spec.scale_dtype``.
    """
    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(1).values, zeros)
    xmax = torch.maximum(w.max(1).values, zeros)
    if spec.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)  # an all-zero group: any scale works, keep it finite
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = ((xmax - xmin) / spec.maxq).to(FLOAT_DTYPES[spec.scale_dtype]).float()
    scale = torch.where(scale == 0, torch.finfo(FLOAT_DTYPES[spec.scale_dtype]).tiny, scale)
    if spec.symmetric:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, spec.maxq)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Integer codes of `w` ([rows, k]) on the grid (scale, zero) given per row ([rows] or [rows, 1])."""
    scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    return scale * (codes.float() - zero)


class QTensor:
    """A quantized [rows, cols] matrix: codes (one uint8 per entry in memory), scales, zeros, perm.

    ``scale``/``zero`` have shape [rows, n_groups]; ``perm`` (optional) lists the columns in the order
    in which groups were formed. Codes and scales are what the file stores; ``dequantize`` rebuilds W.

    ``source`` is in memory only: the float matrix the codes were chosen from, as the quantize step
    received it (set by ``techniques.quant.common.QuantConfig.apply``), so that a later step of the same
    block can re-decide the rounding (``reconstruct`` with ``train: rounding``). It is never stored,
    compared or costed, and the sequential loop drops it when it leaves the block.
    """

    def __init__(self, codes, scale, zero, spec: QuantSpec, perm=None, source: torch.Tensor | None = None):
        self.codes = codes.to(torch.uint8)
        self.scale = scale.to(FLOAT_DTYPES[spec.scale_dtype])
        self.zero = None if spec.symmetric else zero.to(torch.uint8)
        self.spec = spec
        self.perm = None if perm is None else perm.to(torch.int64)
        self.source = source

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def group_index(self) -> torch.Tensor:
        """Group number of every column, in original column order."""
        rows, cols = self.shape
        g = self.spec.group_size or cols
        pos = torch.arange(cols, device=self.codes.device)
        if self.perm is not None:
            inv = torch.empty_like(self.perm)
            inv[self.perm] = torch.arange(cols, device=self.perm.device)
            pos = inv.to(self.codes.device)
        return pos // g

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        gidx = self.group_index()
        scale = self.scale.float()[:, gidx]
        if self.zero is None:
            zero = torch.full_like(scale, (self.spec.maxq + 1) / 2)
        else:
            zero = self.zero.float()[:, gidx]
        return (scale * (self.codes.float() - zero)).to(dtype)

    def nbytes(self, count: int | None = None) -> int:
        rows, cols = self.shape
        return quantized_nbytes(rows, cols, self.spec, count, perm=self.perm is not None)

    def to(self, device) -> "QTensor":
        return QTensor(self.codes.to(device), self.scale.to(device),
                       None if self.zero is None else self.zero.to(device), self.spec,
                       None if self.perm is None else self.perm.to(device),
                       None if self.source is None else self.source.to(device))

    def with_codes(self, codes: torch.Tensor) -> "QTensor":
        return QTensor(codes, self.scale, self.zero, self.spec, self.perm, self.source)

    # -- storage -------------------------------------------------------------------------------
    def state(self, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tensors as stored: codes packed (only where `keep` is true, if given), scales, zeros, perm."""
        codes = self.codes if keep is None else self.codes[keep]
        out = {"codes": pack_bits(codes, self.spec.bits), "scale": self.scale.contiguous()}
        if self.zero is not None:
            out["zero"] = pack_bits(self.zero, self.spec.bits)
        if self.perm is not None:
            out["perm"] = self.perm.to(torch.int16 if self.shape[1] <= 32767 else torch.int32)
        return out

    @classmethod
    def from_state(cls, state, spec: QuantSpec, shape, keep: torch.Tensor | None = None) -> "QTensor":
        rows, cols = shape
        count = rows * cols if keep is None else int(keep.sum())
        flat = unpack_bits(state["codes"], spec.bits, count)
        if keep is None:
            codes = flat.reshape(rows, cols)
        else:
            codes = torch.zeros(rows, cols, dtype=torch.uint8)
            codes[keep] = flat
        groups = spec.n_groups(cols)
        zero = None
        if not spec.symmetric:
            zero = unpack_bits(state["zero"], spec.bits, rows * groups).reshape(rows, groups)
        perm = state.get("perm")
        return cls(codes, state["scale"], zero, spec, None if perm is None else perm.to(torch.int64))


def quantize_rtn(w: torch.Tensor, spec: QuantSpec, perm: torch.Tensor | None = None) -> QTensor:
    """Round-to-nearest quantization of `w` [rows, cols] group by group (a shorter last group is fine)."""
    w = w.float()
    rows, cols = w.shape
    g = spec.group_size or cols
    order = perm if perm is not None else None
    wp = w[:, order] if order is not None else w
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    n_groups = spec.n_groups(cols)
    scale = torch.empty(rows, n_groups, device=w.device)
    zero = torch.empty(rows, n_groups, device=w.device)
    for k in range(n_groups):
        block = wp[:, k * g:(k + 1) * g]
        s, z = grid_params(block, spec)
        scale[:, k], zero[:, k] = s, z
        codes[:, k * g:(k + 1) * g] = quantize_to_grid(block, s, z, spec.maxq).to(torch.uint8)
    if order is not None:
        unperm = torch.empty_like(codes)
        unperm[:, order] = codes
        codes = unperm
    return QTensor(codes, scale, zero, spec, perm)
