"""What a step must not undo: the invariants of the steps before it (DESIGN §2).

A chain composes only if every step keeps what earlier steps made:

* **a mask survives** (prune → quantize): every sparse term of the layer before the step is still there
  afterwards with the same mask, bit for bit; a later step may quantize its values, never move its zeros;
* **codes survive** (quantize → prune): every quantized tensor before the step is still stored
  afterwards with the same codes, scales and zeros (a mask-only pruner wraps the codes in a sparse
  term; only the kept entries are then stored, so codes are compared where the new mask keeps them).
  The one exception is a step that says it leaves the grid (its ``leaves_grid`` capability, e.g. the
  analysis-only SVD of a quantized matrix with ``allow_offgrid: true``), which is meant to replace the codes;
  a step that retrains parts of the grid in place (its ``retrains_grid``: scales, zeros or codes, e.g.
  block reconstruction) is compared on the other parts, and its codes and zeros must stay in 0..maxq;
* **bytes as planned**: the layer the step made stores exactly what ``plan`` said it would, so the
  bytes ``Recipe.check`` reported before loading any weights are the bytes in the file.

`check_step` runs after every step of every Linear in the pipeline and raises `InvariantError`,
naming the layer, the step and what broke, instead of saving a model whose accounting is wrong.
"""

from __future__ import annotations

import torch

from ..core.errors import InvariantError
from .quant import QTensor
from .terms import Sparse


def _quantized_slots(layer):
    for i, term in enumerate(layer.terms):
        for slot, t in term.slots().items():
            if isinstance(t, QTensor):
                yield i, term, slot, t


def _same_codes(a: QTensor, b: QTensor, where: torch.Tensor | None, free: frozenset = frozenset()) -> bool:
    """Whether `b` keeps `a`'s codes, scales and zeros, except the parts in `free` (a step's
    ``retrains_grid``), which need only stay on the grid."""
    if a.spec != b.spec or a.shape != b.shape or ("scale" not in free and not torch.equal(a.scale, b.scale)):
        return False
    if (a.zero is None) != (b.zero is None) or (a.zero is not None and "zero" not in free
                                                 and not torch.equal(a.zero, b.zero)):
        return False
    if (a.perm is None) != (b.perm is None) or (a.perm is not None and not torch.equal(a.perm, b.perm)):
        return False
    if "zero" in free and b.zero is not None and int(b.zero.max()) > b.spec.maxq:
        return False
    if "codes" in free:
        return int(b.codes.max()) <= b.spec.maxq if b.codes.numel() else True
    if where is None:
        return torch.equal(a.codes, b.codes)
    where = where.to(a.codes.device)
    return torch.equal(a.codes[where], b.codes.to(a.codes.device)[where])


def check_step(before, after, step, layer_name: str = "") -> None:
    """Raise `InvariantError` if `after` (what `step` made of `before`) breaks an invariant above.

    `step` is a technique; its ``name``, ``plan``, ``leaves_grid`` and ``retrains_grid`` are read."""
    what = f"{layer_name}: step {step.name!r}"
    planned = step.plan_for(layer_name, before.spec())
    if after.spec() != planned:
        raise InvariantError(f"{what} stored {after.spec().describe()} ({after.nbytes()} bytes) but planned "
                             f"{planned.describe()} ({planned.nbytes()} bytes); the byte accounting would be wrong")
    for i, op in enumerate(getattr(before, "input_ops", ())):
        new = after.input_ops[i] if i < len(after.input_ops) else None
        if new is None or new.meta() != op.meta() or any(
                not torch.equal(a, new.state("x")[k].to(a.device)) for k, a in op.state("x").items()):
            raise InvariantError(f"{what} changed input operation {i} ({op.spec().describe()}) of an earlier step: "
                                 "input operations must survive later steps")
    new_masks = [t.mask for t in after.terms if isinstance(t, Sparse)]
    for term in before.terms:
        if isinstance(term, Sparse):
            mask = term.mask.to(torch.bool)
            if not any(m.shape == mask.shape and torch.equal(m.to(mask.device), mask) for m in new_masks):
                raise InvariantError(f"{what} changed the mask of an earlier sparse term "
                                     f"({int(mask.sum())} kept weights): a mask must survive later steps bit-exactly")
    if step.leaves_grid:
        return
    after_q = list(_quantized_slots(after))
    for _, _, slot, q in _quantized_slots(before):
        if not any(_same_codes(q, q2, getattr(t2, "mask", None), step.retrains_grid) for _, t2, _, q2 in after_q):
            free = f" (it may retrain only its {', '.join(sorted(step.retrains_grid))}, on the same grid)" \
                if step.retrains_grid else ""
            raise InvariantError(f"{what} changed the codes, scales or zeros of an earlier quantized tensor "
                                 f"({slot}, {q.spec.bits} bits){free}: quantized codes must survive later steps")
