"""Input operations: what a compressed Linear applies to its input before its sum of terms.

``y = (Σ_k T_k) · (A_n ⋯ A_1 x) + b``, so the layer's effective weight is ``(Σ_k T_k) · A_n ⋯ A_1``. Two
operations exist, both placed by transforms that make the weights easier to compress:

* `InputScale` (``x → s ⊙ x``, a stored diagonal): AWQ's activation-aware scale where no preceding
  norm or Linear can absorb it. It stores ``in_features`` floats, counted in the layer's bytes.
* `InputRotation` (``x → Q x``, an orthogonal transform regenerated from its kind, size and seed):
  the online Hadamard of QuaRot/SpinQuant (R4). It stores nothing (0 bytes) and is recorded.

The terms live in the transformed basis: a technique that reads the layer's input statistics gets the
statistics of ``A x`` (the pipeline observes x itself, which the layer errors of the effective weight
use; ``techniques.apply.apply_steps`` hands each step `input_stats`), and ``to_dense`` returns the
effective weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.dtypes import FLOAT_BYTES, FLOAT_DTYPES, dtype_name
from ..core.hadamard import KINDS, OrthogonalTransform
from ..core.stats import Stats

TRANSFORM_KINDS = (*KINDS, "hadamard+orthogonal")


@dataclass(frozen=True)
class InputScaleSpec:
    n: int
    dtype: str = "fp16"
    kind: str = "scale"

    def nbytes(self) -> int:
        return self.n * FLOAT_BYTES[self.dtype]

    def describe(self) -> str:
        return f"diag[{self.dtype}]"


@dataclass(frozen=True)
class InputRotationSpec:
    n: int
    transform: str = "hadamard"
    seed: int = 0
    kind: str = "rotate"
    block: int = 0

    def nbytes(self) -> int:
        return 0

    def describe(self) -> str:
        return f"online {self.transform}"


InputOpSpec = InputScaleSpec | InputRotationSpec


class InputScale:
    """``x → s ⊙ x`` with a stored float vector s (kept in its storage dtype)."""

    kind = "scale"

    def __init__(self, scale: torch.Tensor):
        self.scale = scale.detach()

    def spec(self) -> InputScaleSpec:
        return InputScaleSpec(self.scale.shape[0], dtype_name(self.scale.dtype))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.device, x.dtype)

    def matrix(self, dtype=torch.float32) -> torch.Tensor:
        return torch.diag(self.scale.to(dtype))

    def fold_into(self, w: torch.Tensor) -> torch.Tensor:
        """W · diag(s): the effective weight of terms W behind this operation."""
        return w * self.scale.to(w.device, w.dtype).unsqueeze(0)

    def to(self, device) -> "InputScale":
        return InputScale(self.scale.to(device))

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.scale": self.scale.cpu().contiguous()}

    def meta(self) -> dict:
        return {"kind": "scale", "n": self.scale.shape[0], "dtype": dtype_name(self.scale.dtype)}

    @classmethod
    def from_state(cls, prefix: str, meta: dict, state: dict) -> "InputScale":
        scale = state[f"{prefix}.scale"]
        if tuple(scale.shape) != (meta["n"],) or scale.dtype != FLOAT_DTYPES[meta["dtype"]]:
            raise ValueError(f"{prefix}.scale has shape {tuple(scale.shape)} and dtype {scale.dtype}; the metadata "
                             f"says ({meta['n']},) {meta['dtype']}")
        return cls(scale)


class InputRotation:
    """``x → Q x`` with Q an `OrthogonalTransform` (nothing stored but its kind, size and seed)."""

    kind = "rotate"

    def __init__(self, transform: OrthogonalTransform):
        self.transform = transform

    def spec(self) -> InputRotationSpec:
        t = self.transform
        return InputRotationSpec(t.n, t.kind, t.seed, block=t.block)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform.apply(x)

    def matrix(self, dtype=torch.float32) -> torch.Tensor:
        return self.transform.matrix(dtype)

    def fold_into(self, w: torch.Tensor) -> torch.Tensor:
        """W · Q."""
        return (w.double() @ self.transform.matrix(torch.float64).to(w.device)).to(w.dtype)

    def to(self, device) -> "InputRotation":
        return self

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {}

    def meta(self) -> dict:
        t = self.transform
        return {"kind": "rotate", **t.meta()}

    @classmethod
    def from_state(cls, prefix: str, meta: dict, state: dict) -> "InputRotation":
        if meta.get("transform") not in TRANSFORM_KINDS:
            raise ValueError(f"{prefix}: unknown rotation {meta.get('transform')!r}; allowed: {list(TRANSFORM_KINDS)}")
        return cls(OrthogonalTransform.from_meta(meta))


OP_TYPES = {"scale": InputScale, "rotate": InputRotation}


def op_from_state(prefix: str, meta: dict, state: dict):
    if meta.get("kind") not in OP_TYPES:
        raise ValueError(f"{prefix}: unknown input operation {meta.get('kind')!r}; allowed: {sorted(OP_TYPES)}")
    return OP_TYPES[meta["kind"]].from_state(prefix, meta, state)


def effective_weight(w: torch.Tensor, ops) -> torch.Tensor:
    """(Σ T) · A_n ⋯ A_1 for the terms' summed weight `w` behind operations `ops` (applied first to last)."""
    for op in reversed(ops):
        w = op.fold_into(w)
    return w


def input_stats(stats: Stats, ops) -> Stats:
    """The statistics of what the terms multiply, ``A_n ⋯ A_1 x``, from those of the layer's input x.

    The Gram is exact through every operation (A H Aᵀ). The per-channel E|x| and max|x| are exact through a
    diagonal scale (``|s| ⊙``); a rotation mixes the channels, so after one they are unknown and set to NaN
    (a technique that reads them cannot follow a rotation)."""
    gram, abs_mean, absmax = stats.gram, stats.abs_mean, stats.absmax
    for op in ops:
        if isinstance(op, InputScale):
            s = op.scale.to(gram.device, torch.float32)
            gram = gram * torch.outer(s, s)
            abs_mean, absmax = abs_mean * s.abs(), absmax * s.abs()
        else:
            a = op.matrix(torch.float32).to(gram.device)
            gram = a @ gram @ a.T
            abs_mean, absmax = torch.full_like(abs_mean, float("nan")), torch.full_like(absmax, float("nan"))
    return Stats(stats.n_tokens, gram, abs_mean, absmax)
