"""The representation algebra: terms, quantized tensors, shapes-only specs and exact byte counts.

The module that runs a sum of terms as an ``nn.Linear`` is `lmcompose.runtime.linear.CompressedLinear`."""

from .quant import QTensor, QuantSpec, quantize_rtn
from .spec import DenseSpec, LinearSpec, LowRankSpec, SparseSpec, TensorSpec
from .terms import Dense, LowRank, Sparse, as_float, materialize, tensor_spec

__all__ = ["Dense", "DenseSpec", "LinearSpec", "LowRank", "LowRankSpec", "QTensor",
           "QuantSpec", "Sparse", "SparseSpec", "TensorSpec", "as_float", "materialize", "quantize_rtn",
           "tensor_spec"]
