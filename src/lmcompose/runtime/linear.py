"""CompressedLinear: a drop-in replacement for ``nn.Linear`` whose weight is a sum of terms."""

from __future__ import annotations

import torch
from torch import nn

from ..algebra.ops import effective_weight, op_from_state
from ..algebra.quant import QTensor
from ..algebra.spec import LinearSpec, TensorSpec
from ..algebra.terms import TERM_TYPES, Dense, as_float
from ..core.dtypes import dtype_name
from .kernels import Executor, default_paths, path_error


class CompressedLinear(nn.Module):
    """``y = x (Σ_k T_k)ᵀ + b``: Dense and Sparse terms are summed into one matrix for the forward,
    LowRank terms run as two thin matmuls. Dequantized weights are cached in the compute dtype (the
    dtype the module was last cast to); the stored tensors keep their storage dtype whatever
    ``model.to(dtype)`` does, so a cast never loses stored precision.

    ``paths`` records, per term, how the forward multiplies by it (see `runtime.kernels`: dense,
    lowrank, csr, int8, int4, dequant); `set_paths` changes it (``lmcompose.runtime.inference.prepare_inference``
    chooses them for a whole model). The default is the forward described above.
    """

    def __init__(self, in_features: int, out_features: int, terms, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32, input_ops=()):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.terms = tuple(terms)
        self.bias_value = bias
        self.input_ops = tuple(input_ops)  # applied to x before the terms (algebra.ops)
        # A zero-size buffer follows .to()/.cuda()/.half(): it tells us the device and compute dtype.
        self.register_buffer("_probe", torch.empty(0, dtype=compute_dtype,
                                                   device=self._term_device()), persistent=False)
        self.paths = default_paths(self.terms)
        self.kernel_max_rows = 4
        self._cache = None

    def _term_device(self):
        first = self.terms[0].slots() if self.terms else {}
        for t in first.values():
            return t.codes.device if hasattr(t, "codes") else t.device
        return torch.device("cpu")

    @classmethod
    def from_linear(cls, linear: nn.Linear, float_dtype: str = "fp16") -> "CompressedLinear":
        bias = None if linear.bias is None else as_float(linear.bias, float_dtype)
        return cls(linear.in_features, linear.out_features, [Dense(as_float(linear.weight, float_dtype))],
                   bias, compute_dtype=linear.weight.dtype)

    def set_paths(self, paths, kernel_max_rows: int | None = None) -> "CompressedLinear":
        """Choose the execution path of every term (one per term); checked against the current
        device and compute dtype. `kernel_max_rows`: the most input rows the int8/int4 kernels take
        before the forward dequantizes on the fly instead."""
        paths = tuple(paths)
        if len(paths) != len(self.terms):
            raise ValueError(f"paths={paths!r} has {len(paths)} entries; the layer has {len(self.terms)} terms")
        for term, path in zip(self.terms, paths):
            err = path_error(term, path, self._probe.dtype, self._probe.device)
            if err:
                raise ValueError(err)
        self.paths = paths
        if kernel_max_rows is not None:
            self.kernel_max_rows = kernel_max_rows
        self._cache = None
        return self

    @property
    def mode(self) -> str:
        """The distinct execution paths of this layer, e.g. ``"int4"`` or ``"csr+lowrank"``."""
        return "+".join(sorted(set(self.paths))) or "dense"

    def cached_nbytes(self) -> int:
        """Bytes the forward holds beyond the stored terms (float copies, packed kernels); 0 until
        the first forward builds them."""
        return 0 if self._cache is None else self._cache.nbytes()

    def with_terms(self, terms) -> "CompressedLinear":
        new = CompressedLinear(self.in_features, self.out_features, terms, self.bias_value, self._probe.dtype,
                               self.input_ops)
        return new.to(self._probe.device)

    # -- nn.Module plumbing ----------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self._probe.device
        self.terms = tuple(t.to(device) for t in self.terms)
        self.input_ops = tuple(op.to(device) for op in self.input_ops)
        if self.bias_value is not None:
            self.bias_value = self.bias_value.to(device)
        dtype = self._probe.dtype
        if any(path_error(t, p, dtype, device) for t, p in zip(self.terms, self.paths)):
            self.paths = default_paths(self.terms)  # the new device/dtype has no kernel for a chosen path
        self._cache = None
        return self

    def _executor(self) -> Executor:
        if self._cache is None:
            self._cache = Executor(self.terms, self.paths, self.bias_value, self._probe.dtype, self.out_features,
                                   self.kernel_max_rows)
        return self._cache

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the terms multiply: ``A_n ⋯ A_1 x`` (x itself without input operations)."""
        for op in self.input_ops:
            x = op.apply(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._executor()(self.transform_input(x) if self.input_ops else x)

    # -- the algebra -----------------------------------------------------------------------------
    def terms_weight(self, dtype=torch.float32) -> torch.Tensor:
        """Σ_k T_k: the matrix the terms store, in the basis behind the input operations."""
        return torch.stack([t.weight(torch.float32) for t in self.terms]).sum(0).to(dtype)

    def to_dense(self, dtype=torch.float32) -> torch.Tensor:
        """The effective weight, ``(Σ_k T_k) · A_n ⋯ A_1``: what the layer multiplies its input by."""
        w = self.terms_weight(torch.float32)
        return effective_weight(w, self.input_ops).to(dtype) if self.input_ops else w.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dense view for code that reads ``.weight`` (e.g. dtype/device probes in HF models)."""
        return self.to_dense(self._probe.dtype)

    @property
    def bias(self):
        return None if self.bias_value is None else self.bias_value.to(self._probe.dtype)

    def spec(self) -> LinearSpec:
        bias = None
        if self.bias_value is not None:
            bias = TensorSpec(self.out_features, 1, dtype_name(self.bias_value.dtype))
        return LinearSpec(self.out_features, self.in_features, tuple(t.spec() for t in self.terms), bias,
                          tuple(op.spec() for op in self.input_ops))

    def nbytes(self) -> int:
        return self.spec().nbytes()

    def forget_sources(self) -> None:
        """Drop the pre-quantization floats the quantize steps kept on this layer's QTensors (``source``)."""
        for term in self.terms:
            for t in term.slots().values():
                if isinstance(t, QTensor):
                    t.source = None

    # -- storage ---------------------------------------------------------------------------------
    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        for i, term in enumerate(self.terms):
            out.update(term.to("cpu").state(f"{prefix}.terms.{i}"))
        if self.bias_value is not None:
            out[f"{prefix}.bias"] = self.bias_value.cpu().contiguous()
        for i, op in enumerate(self.input_ops):
            out.update(op.state(f"{prefix}.input_ops.{i}"))
        return out

    def meta(self) -> dict:
        meta = {"in_features": self.in_features, "out_features": self.out_features,
                "terms": [t.meta() for t in self.terms], "bias": self.bias_value is not None}
        if self.input_ops:  # absent without operations, so older checkpoints read the same
            meta["input_ops"] = [op.meta() for op in self.input_ops]
        return meta

    @classmethod
    def from_state(cls, prefix: str, meta: dict, state: dict, compute_dtype=torch.float32) -> "CompressedLinear":
        terms = [TERM_TYPES[m["kind"]].from_state(f"{prefix}.terms.{i}", m, state)
                 for i, m in enumerate(meta["terms"])]
        bias = state[f"{prefix}.bias"] if meta["bias"] else None
        ops = [op_from_state(f"{prefix}.input_ops.{i}", m, state) for i, m in enumerate(meta.get("input_ops", []))]
        return cls(meta["in_features"], meta["out_features"], terms, bias, compute_dtype, ops)

    def extra_repr(self) -> str:
        spec = self.spec()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{spec.describe()}, {spec.bits_per_weight():.2f} bits/weight")
