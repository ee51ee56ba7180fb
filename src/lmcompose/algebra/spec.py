"""Shapes-only descriptions of compressed layers, and their exact byte counts.

A spec is what a layer *will* store, without any weights: ``Recipe.check`` walks the recipe over
specs to type-check it and cost it before a model is loaded, and a real layer reports its own spec, so
costing and the saved file share one formula. Storage rules (DESIGN §2):

* a float tensor costs its element size per stored value (fp16/bf16: 2, fp32: 4);
* a quantized tensor costs packed codes + one scale per group (+ a packed zero point if asymmetric)
  (+ a stored column permutation for act-order);
* a sparse term stores only its nonzeros plus an index: N:M metadata at ceil(log2 C(M,N)) bits per
  group, or for unstructured masks the smaller of a bitmask (1 bit per entry) and CSR
  (int16 or int32 column indices + 32-bit row pointers);
* a low-rank term stores U (m x r), V (r x n) and, optionally, a diagonal d (r).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..core.dtypes import FLOAT_BYTES
from .packing import nm_index_bits, packed_nbytes
from .quant import QuantSpec, quantized_nbytes


@dataclass(frozen=True)
class TensorSpec:
    rows: int
    cols: int
    dtype: str = "fp16"
    quant: QuantSpec | None = None
    perm: bool = False

    def nbytes(self, count: int | None = None) -> int:
        if self.quant is not None:
            return quantized_nbytes(self.rows, self.cols, self.quant, count, self.perm)
        return (self.rows * self.cols if count is None else count) * FLOAT_BYTES[self.dtype]

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def describe(self) -> str:
        if self.quant is None:
            return self.dtype
        q = self.quant
        sym = "sym" if q.symmetric else "asym"
        return f"int{q.bits} g{q.group_size or 'row'} {sym}" + (" act-order" if self.perm else "")


@dataclass(frozen=True)
class DenseSpec:
    a: TensorSpec
    kind: str = field(default="dense", init=False)

    def nbytes(self) -> int:
        return self.a.nbytes()

    def tensors(self) -> dict[str, TensorSpec]:
        return {"a": self.a}

    def describe(self) -> str:
        return f"dense[{self.a.describe()}]"


def csr_nbytes(rows: int, cols: int, nnz: int) -> int:
    index = 2 if cols <= 32767 else 4
    ptr = 4 if nnz < 2**31 else 8
    return nnz * index + (rows + 1) * ptr


@dataclass(frozen=True)
class SparseSpec:
    values: TensorSpec
    nnz: int
    n: int | None = None  # N:M pattern (keep n of every m consecutive input columns), else unstructured
    m: int | None = None
    kind: str = field(default="sparse", init=False)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.n else "unstructured"

    def index_format(self) -> str:
        if self.n:
            return "nm"
        rows, cols = self.values.rows, self.values.cols
        return "bitmask" if packed_nbytes(rows * cols, 1) <= csr_nbytes(rows, cols, self.nnz) else "csr"

    def index_nbytes(self) -> int:
        rows, cols = self.values.rows, self.values.cols
        fmt = self.index_format()
        if fmt == "nm":
            return packed_nbytes(rows * (cols // self.m), nm_index_bits(self.n, self.m))
        if fmt == "bitmask":
            return packed_nbytes(rows * cols, 1)
        return csr_nbytes(rows, cols, self.nnz)

    def nbytes(self) -> int:
        return self.values.nbytes(self.nnz) + self.index_nbytes()

    def tensors(self) -> dict[str, TensorSpec]:
        return {"values": self.values}

    def describe(self) -> str:
        density = self.nnz / (self.values.rows * self.values.cols)
        return f"sparse[{self.pattern} {1 - density:.1%} {self.index_format()} {self.values.describe()}]"


@dataclass(frozen=True)
class LowRankSpec:
    u: TensorSpec
    v: TensorSpec
    d: TensorSpec | None = None
    kind: str = field(default="lowrank", init=False)

    @property
    def rank(self) -> int:
        return self.u.cols

    def nbytes(self) -> int:
        return self.u.nbytes() + self.v.nbytes() + (self.d.nbytes() if self.d else 0)

    def tensors(self) -> dict[str, TensorSpec]:
        return {"u": self.u, "v": self.v}

    def describe(self) -> str:
        return f"lowrank[r={self.rank} U {self.u.describe()} V {self.v.describe()}{' +d' if self.d else ''}]"


TermSpec = DenseSpec | SparseSpec | LowRankSpec


@dataclass(frozen=True)
class LinearSpec:
    """What one Linear stores: a sum of terms plus an optional bias, behind optional input operations
    (`lmcompose.algebra.ops`: a stored diagonal scale, or an online rotation that stores nothing)."""

    out_features: int
    in_features: int
    terms: tuple = ()
    bias: TensorSpec | None = None
    input_ops: tuple = ()

    @classmethod
    def dense(cls, out_features: int, in_features: int, dtype: str = "fp16", bias: bool = False) -> "LinearSpec":
        return cls(out_features, in_features, (DenseSpec(TensorSpec(out_features, in_features, dtype)),),
                   TensorSpec(out_features, 1, dtype) if bias else None)

    def nbytes(self) -> int:
        return (sum(t.nbytes() for t in self.terms) + (self.bias.nbytes() if self.bias else 0)
                + sum(op.nbytes() for op in self.input_ops))

    def dense_fp16_nbytes(self) -> int:
        """The reference every `ratio` refers to: this Linear in fp16, bias included."""
        return 2 * self.out_features * self.in_features + (2 * self.out_features if self.bias else 0)

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / (self.out_features * self.in_features)

    def with_terms(self, terms) -> "LinearSpec":
        return replace(self, terms=tuple(terms))

    def kinds(self) -> tuple[str, ...]:
        return tuple(t.kind for t in self.terms)

    def with_input_ops(self, ops) -> "LinearSpec":
        return replace(self, input_ops=tuple(ops))

    def describe(self) -> str:
        terms = " + ".join(t.describe() for t in self.terms)
        return f"({terms}) · {' · '.join(op.describe() for op in reversed(self.input_ops))}" if self.input_ops \
            else terms
