"""Model-level online operations: orthogonal maps applied around whole modules, outside any Linear.

A rotation of the residual stream (``techniques/transform/rotate.py``) is fused into the weights wherever
a weight can absorb it; where none can, the model applies it online, as forward hooks on one module:

* ``rotate_output`` on a module f: ``y = Q f(x)``. Gemma-3's post-norms sit between a Linear and the
  residual add; a norm with a per-channel weight does not commute with Q, so the Linear's output stays
  unrotated and Q is applied after the norm. On a Linear whose weight was fused as ``W ← Qᵀ W``
  (``rotate: {output: true}``, QuIP's output-side incoherence), it gives back the Linear's own output.
* ``conjugate`` on a module f: ``y = Q f(Qᵀ x)``. The final norm of a model whose head shares the
  embedding matrix (tied): the embedding is rotated, so the head is too, and the norm between them must
  see the unrotated stream and hand back a rotated one.

Each op stores only what regenerates Q (kind, size, seed): 0 bytes. The hooks change no state-dict key;
`model_ops` lists the attached ops so that a checkpoint records them (``lmcompose.json``, "model_ops") and
loading re-attaches them (`attach_model_op`). A module replaced by another (a Linear by its compressed form)
hands its op hooks over (`replace_module`, through which every swap goes). An op kind this code does not know is refused.

Example::

    op = ModelOp("conjugate", "model.norm", OrthogonalTransform.create(576, "hadamard", 0))
    attach_model_op(model, op)
    model_ops(model)                 # [op]
    ModelOp.from_meta(op.meta())     # == op

Method notes: docs/methods/transforms.md
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..algebra.ops import TRANSFORM_KINDS
from ..core.hadamard import OrthogonalTransform

MODEL_OP_KINDS = ("rotate_output", "conjugate")
_ATTR = "_lmcompose_model_ops"  # a plain attribute of the model: no parameter, buffer or state-dict key


@dataclass(frozen=True)
class ModelOp:
    """One online operation: `kind` (see the module docstring) on the module named `module` (from the root)."""

    kind: str
    module: str
    transform: OrthogonalTransform

    def __post_init__(self):
        if self.kind not in MODEL_OP_KINDS:
            raise ValueError(f"model op kind {self.kind!r} is not known to this lmcompose; allowed: "
                             f"{list(MODEL_OP_KINDS)}")

    def nbytes(self) -> int:
        return 0

    def describe(self) -> str:
        what = "Q·f(x)" if self.kind == "rotate_output" else "Q·f(Qᵀx)"
        return f"{self.kind} on {self.module}: {what}, online {self.transform.kind}[{self.transform.n}]"

    def meta(self) -> dict:
        t = self.transform
        return {"kind": self.kind, "module": self.module, **t.meta()}

    @classmethod
    def from_meta(cls, meta: dict) -> "ModelOp":
        kind = meta.get("kind")
        if kind not in MODEL_OP_KINDS:
            raise ValueError(f"unknown model op kind {kind!r} (on {meta.get('module')!r}); this lmcompose knows "
                             f"{list(MODEL_OP_KINDS)}: the checkpoint needs a newer lmcompose")
        if meta.get("transform") not in TRANSFORM_KINDS:
            raise ValueError(f"model op {kind} on {meta.get('module')!r}: unknown transform "
                             f"{meta.get('transform')!r}; allowed: {list(TRANSFORM_KINDS)}")
        return cls(kind, str(meta["module"]), OrthogonalTransform.from_meta(meta))


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out, y):
    if isinstance(out, tuple):
        return (y, *out[1:])
    if isinstance(out, list):
        return [y, *out[1:]]
    return y


class _RotateOutput:
    """Forward hook: the module's output y becomes Q y."""

    def __init__(self, transform: OrthogonalTransform):
        self.transform = transform

    def __call__(self, module, args, out):
        return _replace_first(out, self.transform.apply(_first(out)))


class _InverseInput:
    """Forward pre-hook: the module's first positional input x becomes Qᵀ x."""

    def __init__(self, transform: OrthogonalTransform):
        self.transform = transform

    def __call__(self, module, args):
        return (self.transform.apply_inverse(args[0]), *args[1:])


def attach_model_op(model: nn.Module, op: ModelOp) -> None:
    """Register `op`'s hooks on its module and list it in `model_ops(model)` (a deep copy of the model
    copies both)."""
    module = model.get_submodule(op.module)
    if any(o.module == op.module for o in model_ops(model)):
        raise ValueError(f"{op.module} already carries a model op; one op per module")
    module.register_forward_hook(_RotateOutput(op.transform))
    if op.kind == "conjugate":
        module.register_forward_pre_hook(_InverseInput(op.transform))
    model.__dict__.setdefault(_ATTR, []).append(op)


def carry_model_ops(old: nn.Module, new: nn.Module) -> None:
    """Move the model-op hooks of `old` onto `new`, the module replacing it (a Linear becoming a
    `CompressedLinear` keeps its online output rotation); other hooks stay where they are."""
    for hooks, register in ((old._forward_hooks, new.register_forward_hook),
                            (old._forward_pre_hooks, new.register_forward_pre_hook)):
        for key in [k for k, h in hooks.items() if isinstance(h, (_RotateOutput, _InverseInput))]:
            register(hooks.pop(key))


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at `name` (relative to `root`), handing over the model-op hooks of the module it replaces:
    every swap of a Linear for its compressed form goes through here, so no online rotation is lost."""
    parent, _, child = name.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    old = getattr(owner, child, None)
    if old is not None and old is not module:
        carry_model_ops(old, module)
    setattr(owner, child, module)


def model_ops(model: nn.Module) -> list[ModelOp]:
    """The model-level online operations attached to `model`, in the order they were attached."""
    return list(model.__dict__.get(_ATTR, []))


def detach_model_ops(model: nn.Module) -> list[ModelOp]:
    """Remove every attached op's hooks; returns the ops removed."""
    ops = model.__dict__.pop(_ATTR, [])
    for op in ops:
        module = model.get_submodule(op.module)
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if isinstance(h, (_RotateOutput, _InverseInput))]:
                del hooks[key]
    return ops


@torch.no_grad()
def check_model_ops(model: nn.Module, ops) -> None:
    """Raise ValueError if an op names a module the model lacks or one whose width is not the op's."""
    for op in ops:
        try:
            module = model.get_submodule(op.module)
        except AttributeError:
            raise ValueError(f"model op {op.kind} names {op.module!r}, which this model does not have") from None
        out = getattr(module, "out_features", None)  # a Linear: its output is what the op rotates
        widths = {out} if out is not None and op.kind == "rotate_output" else \
            {p.shape[-1] for p in module.parameters(recurse=False)}
        if widths and op.transform.n not in widths:
            raise ValueError(f"model op {op.kind} on {op.module} rotates width {op.transform.n}, but the module's "
                             f"parameters have widths {sorted(widths)}")
