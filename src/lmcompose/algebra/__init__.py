"""The representation algebra: terms, quantized tensors, CompressedLinear and exact byte counts."""

from .linear import CompressedLinear
from .quant import QTensor, QuantSpec, quantize_rtn
from .spec import DenseSpec, LinearSpec, LowRankSpec, SparseSpec, TensorSpec
from .terms import Dense, LowRank, Sparse, as_float, materialize, tensor_spec

__all__ = ["CompressedLinear", "Dense", "DenseSpec", "LinearSpec", "LowRank", "LowRankSpec", "QTensor",
           "QuantSpec", "Sparse", "SparseSpec", "TensorSpec", "as_float", "materialize", "quantize_rtn",
           "tensor_spec"]
