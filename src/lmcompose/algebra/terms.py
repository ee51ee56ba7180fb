"""The three terms a compressed Linear is a sum of: Dense, Sparse and LowRank (DESIGN §2).

Every stored tensor is either a float tensor held in its storage dtype (fp16 by default) or a
:class:`QTensor`. In memory a sparse term keeps its values in dense layout next to a boolean mask, so
techniques can use plain tensor math; on disk it keeps only the nonzeros plus the index, and
``spec().nbytes()`` counts exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..core.dtypes import FLOAT_DTYPES, dtype_name
from .packing import decode_nm, encode_nm, nm_index_bits, pack_bits, unpack_bits
from .quant import QTensor, QuantSpec
from .spec import DenseSpec, LowRankSpec, SparseSpec, TensorSpec

Stored = torch.Tensor | QTensor


def tensor_spec(t: Stored) -> TensorSpec:
    if isinstance(t, QTensor):
        return TensorSpec(*t.shape, quant=t.spec, perm=t.perm is not None)
    return TensorSpec(*t.shape, dtype=dtype_name(t.dtype))


def materialize(t: Stored, dtype=torch.float32) -> torch.Tensor:
    return t.dequantize(dtype) if isinstance(t, QTensor) else t.to(dtype)


def _move(t: Stored | None, device):
    return None if t is None else t.to(device)


def _store(prefix: str, t: Stored, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Tensors of one stored slot, under `prefix.`; `keep` selects the stored entries of a sparse slot."""
    if isinstance(t, QTensor):
        return {f"{prefix}.{k}": v for k, v in t.state(keep).items()}
    return {prefix: (t if keep is None else t[keep]).contiguous()}


def _slot_meta(t: Stored) -> dict:
    spec = tensor_spec(t)
    meta = {"shape": [spec.rows, spec.cols], "dtype": spec.dtype}
    if spec.quant is not None:
        meta["quant"] = spec.quant.to_dict()
    return meta


def _load(prefix: str, meta: dict, state: dict, keep: torch.Tensor | None = None) -> Stored:
    shape = tuple(meta["shape"])
    if "quant" in meta:
        sub = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        return QTensor.from_state(sub, QuantSpec(**meta["quant"]), shape, keep)
    flat = state[prefix]
    if keep is None:
        return flat.reshape(shape)
    out = torch.zeros(shape, dtype=flat.dtype)
    out[keep] = flat
    return out


@dataclass(frozen=True)
class Dense:
    a: Stored
    kind = "dense"

    def slots(self) -> dict[str, Stored]:
        return {"a": self.a}

    def replace(self, **slots) -> "Dense":
        return replace(self, **slots)

    def spec(self) -> DenseSpec:
        return DenseSpec(tensor_spec(self.a))

    def weight(self, dtype=torch.float32) -> torch.Tensor:
        return materialize(self.a, dtype)

    def to(self, device) -> "Dense":
        return Dense(self.a.to(device))

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return _store(f"{prefix}.a", self.a)

    def meta(self) -> dict:
        return {"kind": "dense", "a": _slot_meta(self.a)}

    @classmethod
    def from_state(cls, prefix: str, meta: dict, state: dict) -> "Dense":
        return cls(_load(f"{prefix}.a", meta["a"], state))


@dataclass(frozen=True)
class Sparse:
    """Values in dense layout plus a boolean keep-mask; `n`/`m` set for an N:M pattern."""

    values: Stored
    mask: torch.Tensor
    n: int | None = None
    m: int | None = None
    kind = "sparse"

    def slots(self) -> dict[str, Stored]:
        return {"values": self.values}

    def replace(self, **slots) -> "Sparse":
        return replace(self, **slots)

    def spec(self) -> SparseSpec:
        return SparseSpec(tensor_spec(self.values), int(self.mask.sum()), self.n, self.m)

    def weight(self, dtype=torch.float32) -> torch.Tensor:
        # Multiplying by the mask keeps pruned entries exactly zero whatever the value slot holds.
        return materialize(self.values, dtype) * self.mask.to(dtype)

    def to(self, device) -> "Sparse":
        return Sparse(self.values.to(device), self.mask.to(device), self.n, self.m)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        mask = self.mask.cpu()
        out = _store(f"{prefix}.values", _move(self.values, "cpu"), keep=mask)
        fmt = self.spec().index_format()
        if fmt == "nm":
            out[f"{prefix}.index"] = pack_bits(encode_nm(mask, self.n, self.m), nm_index_bits(self.n, self.m))
        elif fmt == "bitmask":
            out[f"{prefix}.index"] = pack_bits(mask, 1)
        else:
            rows, cols = mask.shape
            idx = mask.nonzero()
            out[f"{prefix}.col"] = idx[:, 1].to(torch.int16 if cols <= 32767 else torch.int32)
            ptr = torch.zeros(rows + 1, dtype=torch.int64)
            ptr[1:] = mask.sum(1).cumsum(0)
            out[f"{prefix}.rowptr"] = ptr.to(torch.int32 if int(ptr[-1]) < 2**31 else torch.int64)
        return out

    def meta(self) -> dict:
        return {"kind": "sparse", "values": _slot_meta(self.values), "n": self.n, "m": self.m,
                "nnz": int(self.mask.sum()), "index": self.spec().index_format()}

    @classmethod
    def from_state(cls, prefix: str, meta: dict, state: dict) -> "Sparse":
        rows, cols = meta["values"]["shape"]
        n, m = meta["n"], meta["m"]
        if meta["index"] == "nm":
            groups = rows * (cols // m)
            index = unpack_bits(state[f"{prefix}.index"], nm_index_bits(n, m), groups)
            mask = decode_nm(index, n, m, rows, cols)
        elif meta["index"] == "bitmask":
            mask = unpack_bits(state[f"{prefix}.index"], 1, rows * cols).reshape(rows, cols).bool()
        else:
            col = state[f"{prefix}.col"].to(torch.int64)
            ptr = state[f"{prefix}.rowptr"].to(torch.int64)
            row = torch.repeat_interleave(torch.arange(rows), ptr[1:] - ptr[:-1])
            mask = torch.zeros(rows, cols, dtype=torch.bool)
            mask[row, col] = True
        return cls(_load(f"{prefix}.values", meta["values"], state, keep=mask), mask, n, m)


@dataclass(frozen=True)
class LowRank:
    """W ≈ U diag(d) V, with U [m, r], V [r, n] and an optional float diagonal d [r]."""

    u: Stored
    v: Stored
    d: torch.Tensor | None = None
    kind = "lowrank"

    def slots(self) -> dict[str, Stored]:
        return {"u": self.u, "v": self.v}

    def replace(self, **slots) -> "LowRank":
        return replace(self, **slots)

    def spec(self) -> LowRankSpec:
        d = None if self.d is None else TensorSpec(self.d.shape[0], 1, dtype_name(self.d.dtype))
        return LowRankSpec(tensor_spec(self.u), tensor_spec(self.v), d)

    def factors(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, diag(d) V) in `dtype`: the two matrices the forward multiplies by."""
        u, v = materialize(self.u, dtype), materialize(self.v, dtype)
        if self.d is not None:
            v = self.d.to(dtype).unsqueeze(1) * v
        return u, v

    def weight(self, dtype=torch.float32) -> torch.Tensor:
        u, v = self.factors(torch.float32)
        return (u @ v).to(dtype)

    def to(self, device) -> "LowRank":
        return LowRank(self.u.to(device), self.v.to(device), _move(self.d, device))

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {**_store(f"{prefix}.u", self.u), **_store(f"{prefix}.v", self.v)}
        if self.d is not None:
            out[f"{prefix}.d"] = self.d.contiguous()
        return out

    def meta(self) -> dict:
        return {"kind": "lowrank", "u": _slot_meta(self.u), "v": _slot_meta(self.v), "d": self.d is not None}

    @classmethod
    def from_state(cls, prefix: str, meta: dict, state: dict) -> "LowRank":
        return cls(_load(f"{prefix}.u", meta["u"], state), _load(f"{prefix}.v", meta["v"], state),
                   state[f"{prefix}.d"] if meta["d"] else None)


TERM_TYPES = {"dense": Dense, "sparse": Sparse, "lowrank": LowRank}
Term = Dense | Sparse | LowRank


def as_float(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """A float tensor rounded to its storage dtype (what the file will hold)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype={dtype!r} is not allowed; allowed: {sorted(FLOAT_DTYPES)}")
    return t.detach().to(FLOAT_DTYPES[dtype])
