"""Execution paths of a CompressedLinear's forward: which kernel multiplies the input by which term.

A layer's forward is ``y = b + Σ_k part_k(x)``; every term is assigned one path (`PATHS`): ``dense``
(materialized and summed into one cached matrix, the default forward), ``lowrank`` (two thin matmuls),
``csr`` (``torch.sparse_csr``), ``int8`` / ``int4`` (torch's weight-only CPU kernels, used for a handful
of input rows only; more rows dequantize on the fly), or ``dequant`` (no cached copy). `path_error` says
why a term cannot take a path.

Method notes: docs/methods/inference.md (each path's conditions and costs)
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..algebra.quant import QTensor
from ..algebra.terms import Dense, LowRank, Sparse

PATHS = ("dense", "lowrank", "csr", "int8", "int4", "dequant")
INT4_GROUPS = (32, 64, 128, 256)
CSR_CPU_DTYPES = (torch.float32, torch.float64)


def default_paths(terms) -> tuple[str, ...]:
    """The forward CompressedLinear always had: Dense/Sparse summed, LowRank factored."""
    return tuple("lowrank" if isinstance(t, LowRank) else "dense" for t in terms)


def quantized_slot(term) -> QTensor | None:
    slot = term.a if isinstance(term, Dense) else term.values if isinstance(term, Sparse) else None
    return slot if isinstance(slot, QTensor) else None


def path_error(term, path: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why `term` cannot run on `path` with this compute dtype and device, or None if it can."""
    if path not in PATHS:
        return f"path={path!r} is not allowed; allowed: {list(PATHS)}"
    if path == "dense":
        return None
    if path == "lowrank":
        return None if isinstance(term, LowRank) else f"path 'lowrank' needs a LowRank term, got {term.kind}"
    if isinstance(term, LowRank):
        return f"a LowRank term runs on 'lowrank' or 'dense', not {path!r}"
    if path == "dequant":
        return None
    if path == "csr":
        if not isinstance(term, Sparse):
            return f"path 'csr' needs a Sparse term, got {term.kind}"
        if device.type == "cpu" and dtype not in CSR_CPU_DTYPES:
            return f"torch's CPU CSR matmul supports {CSR_CPU_DTYPES}, not compute dtype {dtype}"
        return None
    q = quantized_slot(term)
    if q is None:
        return f"path {path!r} needs a quantized term"
    if device.type != "cpu":
        return f"path {path!r} uses a CPU kernel; device is {device}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"path {path!r} needs a float compute dtype, got {dtype}"
    rows, cols = q.shape
    g = q.spec.group_size or cols
    if path == "int8":
        return None if g >= cols else f"int8 kernel has one scale per row; group_size={g} < in_features={cols}"
    if q.spec.bits > 4:
        return f"int4 kernel needs bits <= 4, got {q.spec.bits}"
    if g not in INT4_GROUPS or cols % g:
        return f"int4 kernel needs a group size in {INT4_GROUPS} dividing in_features={cols}, got {g}"
    if rows % 16:
        return f"int4 kernel needs out_features divisible by 16, got {rows}"
    return None


def _codes_with_zeros(term, q: QTensor) -> torch.Tensor:
    """uint8 codes, with pruned entries of a Sparse term set to their group's zero point (→ exactly 0)."""
    if not isinstance(term, Sparse):
        return q.codes
    zero = torch.full_like(q.scale, (q.spec.maxq + 1) // 2, dtype=torch.uint8) if q.zero is None else q.zero
    return torch.where(term.mask, q.codes, zero[:, q.group_index()])


def _zero_float(q: QTensor) -> torch.Tensor:
    """Zero points as fp32 [rows, groups] (the constant midpoint for a symmetric grid)."""
    if q.zero is None:
        return torch.full(q.scale.shape, (q.spec.maxq + 1) / 2, device=q.scale.device)
    return q.zero.float()


def dequantize_fast(q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """`q.dequantize(dtype)` bit for bit (fp32 math, one cast), without the per-column gather when the
    groups are contiguous: about 6x faster on one CPU core."""
    rows, cols = q.shape
    g = q.spec.group_size or cols
    if q.perm is not None or cols % g:
        return q.dequantize(dtype)
    w = q.codes.view(rows, cols // g, g).to(torch.float32)
    w.sub_(_zero_float(q).unsqueeze(2)).mul_(q.scale.float().unsqueeze(2))
    return w.view(rows, cols).to(dtype)


def term_weight_now(term, dtype: torch.dtype) -> torch.Tensor:
    """The term's dense weight in `dtype`, computed now (nothing cached)."""
    q = quantized_slot(term)
    if q is None:
        return term.weight(torch.float32).to(dtype)
    w = dequantize_fast(q, torch.float32)
    if isinstance(term, Sparse):
        w.mul_(term.mask)
    return w.to(dtype)


def to_csr(w: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # torch warns on every conversion that CSR support is "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return w.to_sparse_csr()


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class _Matmul:
    path = "dense"

    def __init__(self, weight):
        self.weight = weight

    def __call__(self, x):
        return F.linear(x, self.weight)

    def nbytes(self):
        return _nbytes(self.weight)


class _Factored:
    path = "lowrank"

    def __init__(self, u, v):
        self.u, self.v = u, v

    def __call__(self, x):
        return F.linear(F.linear(x, self.v), self.u)

    def nbytes(self):
        return _nbytes(self.u, self.v)


class _CSR:
    path = "csr"

    def __init__(self, term, dtype):
        self.weight = to_csr(term.weight(torch.float32).to(dtype))

    def __call__(self, x):
        y = torch.sparse.mm(self.weight, _flat(x).t()).t()
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def nbytes(self):
        w = self.weight
        return _nbytes(w.values(), w.col_indices(), w.crow_indices())


class _Dequant:
    """Dequantize (or cast) the stored term on every call; holds no copy of its own."""

    path = "dequant"

    def __init__(self, term, dtype):
        self.term, self.dtype = term, dtype

    def __call__(self, x):
        return F.linear(x, term_weight_now(self.term, self.dtype))

    def nbytes(self):
        return 0


class _Int8(_Dequant):
    path = "int8"

    def __init__(self, term, dtype, max_rows):
        super().__init__(term, dtype)
        q, self.max_rows = quantized_slot(term), max_rows
        codes, zero, scale = _codes_with_zeros(term, q).to(torch.int16), _zero_float(q)[:, :1], q.scale.float()[:, 0]
        centred = codes - zero.to(torch.int16)
        self.correction = None
        if centred.min() < -128 or centred.max() > 127:  # only 8-bit asymmetric codes can overflow
            centred = codes - 128
            self.correction = (scale * (128 - zero[:, 0])).to(dtype)
        self.codes = centred.to(torch.int8).contiguous()
        self.scale = scale.to(dtype)

    def __call__(self, x):
        x2 = _flat(x)
        if x2.shape[0] > self.max_rows:
            return super().__call__(x)
        y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.codes, self.scale)
        if self.correction is not None:
            y = y + x2.float().sum(-1, keepdim=True).to(self.dtype) * self.correction
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def nbytes(self):
        return _nbytes(self.codes, self.scale, self.correction)


class _Int4(_Dequant):
    path = "int4"

    def __init__(self, term, dtype, max_rows):
        super().__init__(term, dtype)
        q, self.max_rows = quantized_slot(term), max_rows
        rows, cols = q.shape
        self.group = q.spec.group_size or cols
        codes = _codes_with_zeros(term, q)
        self.perm = q.perm
        if self.perm is not None:  # groups are contiguous in act-order; gather x's columns to match
            codes = codes[:, self.perm]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scale = q.scale.float()
        zero = scale * (8 - _zero_float(q))
        self.scale_zero = torch.stack([scale.t(), zero.t()], -1).to(dtype).contiguous()

    def __call__(self, x):
        x2 = _flat(x)
        if x2.shape[0] > self.max_rows:
            return super().__call__(x)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group, self.scale_zero)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def nbytes(self):
        return _nbytes(self.packed, self.scale_zero)


class Executor:
    """The parts of one layer's forward, built once per (paths, dtype, device) and cached by the layer."""

    def __init__(self, terms, paths, bias, dtype: torch.dtype, out_features: int, kernel_max_rows: int = 4):
        dense = [t for t, p in zip(terms, paths) if p == "dense"]
        self.parts = []
        if dense:
            self.parts.append(_Matmul(torch.stack([t.weight(torch.float32) for t in dense]).sum(0).to(dtype)))
        for t, p in zip(terms, paths):
            if p == "lowrank":
                self.parts.append(_Factored(*t.factors(dtype)))
            elif p == "csr":
                self.parts.append(_CSR(t, dtype))
            elif p == "dequant":
                self.parts.append(_Dequant(t, dtype))
            elif p == "int8":
                self.parts.append(_Int8(t, dtype, kernel_max_rows))
            elif p == "int4":
                self.parts.append(_Int4(t, dtype, kernel_max_rows))
        self.bias = None if bias is None else bias.to(dtype)
        self.out_features = out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.parts
        if parts and isinstance(parts[0], _Matmul):  # the bias rides along in the GEMM
            y, parts = F.linear(x, parts[0].weight, self.bias), parts[1:]
        else:
            y = x.new_zeros(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y = y + self.bias
        for part in parts:
            y = y + part(x)
        return y

    def nbytes(self) -> int:
        """Bytes this executor holds beyond the layer's stored terms (caches, packed kernels)."""
        return sum(p.nbytes() for p in self.parts) + _nbytes(self.bias)
