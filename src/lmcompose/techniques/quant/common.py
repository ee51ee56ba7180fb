"""What every quantizer shares: the grid fields, the `target` rule, and per-slot Hessians.

A quantize step names the terms whose float tensors it quantizes: ``dense``, ``sparse``, ``lowrank``
or ``all``. Each such tensor ("slot") gets its own grid. Order has meaning (DESIGN §2): a sparse term's
mask survives bit-exactly because the stored weight is ``dequantize(codes) * mask``; a low-rank term's
factors U and V are quantized separately (L → Q).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...algebra.quant import QTensor, QuantSpec
from ...algebra.spec import LinearSpec, TensorSpec
from ...algebra.terms import Dense, LowRank, materialize
from ...core.errors import IllegalStep
from ..base import Technique
from ..budget import budget_bytes
from ..fields import ScaleDtype, setting

Target = Literal["dense", "sparse", "lowrank", "all"]


class QuantConfig(Technique):
    family: ClassVar[str] = "quantize"
    ratio_replaces: ClassVar[tuple[str, ...]] = ("bits",)
    # True when each output row's codes depend only on that row and the input Gram (RTN, GPTQ): Linears
    # that read one input can then be quantized as one matrix of stacked rows (`apply_stacked`).
    row_separable: ClassVar[bool] = False

    bits: int | None = setting("bits", None, doc="bits per weight code (default 4 unless `ratio` is given)")
    ratio: float | None = Field(None, gt=0.0, le=1.0, description="fraction of the Linear's fp16 bytes to keep "
                                "(codes, scales, zeros); picks the largest bits that fit")
    group_size: int | None = setting("group_size")
    symmetric: bool = setting("symmetric")
    scale_dtype: ScaleDtype = setting("scale_dtype")
    target: Target = Field("all", description="which terms' float tensors to quantize: dense, sparse, lowrank, all")

    @model_validator(mode="after")
    def _budget(self):
        if self.bits is not None and self.ratio is not None:
            raise ValueError(f"give one of bits={self.bits} and ratio={self.ratio}, not both")
        return self

    def qspec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.group_size, self.symmetric, self.scale_dtype)

    def _matches(self, kind: str) -> bool:
        return self.target == "all" or self.target == kind

    def _plan_bits(self, spec: LinearSpec, bits: int) -> LinearSpec:
        terms, hit = [], False
        for term in spec.terms:
            if not self._matches(term.kind):
                terms.append(term)
                continue
            new = {}
            for slot, ts in term.tensors().items():
                if ts.quantized:
                    raise IllegalStep(f"the {term.kind} term's {slot} is already quantized")
                new[slot] = TensorSpec(ts.rows, ts.cols, quant=self.qspec(bits), perm=self.stores_perm)
                hit = True
            terms.append(_replace_spec(term, new))
        if not hit:
            raise IllegalStep(f"target={self.target!r} matches no term of {spec.describe()}")
        return spec.with_terms(terms)

    @property
    def stores_perm(self) -> bool:
        return False

    def resolve_bits(self, spec: LinearSpec) -> int:
        if self.ratio is None:
            return self.bits or 4
        budget = budget_bytes(spec, self.ratio)
        fits = [b for b in range(2, 9) if self._plan_bits(spec, b).nbytes() <= budget]
        if not fits:
            raise IllegalStep(f"ratio={self.ratio} is below what 2-bit codes with group_size={self.group_size} cost")
        return max(fits)

    def plan(self, spec: LinearSpec) -> LinearSpec:
        return self._plan_bits(spec, self.resolve_bits(spec))

    def apply(self, layer, stats):
        bits = self.resolve_bits(layer.spec())
        terms = []
        for term in layer.terms:
            if not self._matches(term.kind):
                terms.append(term)
                continue
            new = {}
            for slot, h in slot_hessians(term, None if stats is None else stats.gram):
                w = materialize(term.slots()[slot], torch.float32)
                mask = getattr(term, "mask", None)
                new[slot] = self.quantize_slot(w, h(new), mask, bits)
                new[slot].source = term.slots()[slot]  # in memory only (see QTensor): reconstruct's rounding
            terms.append(term.replace(**new))
        return layer.with_terms(terms), {"bits": bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def quantize_slot(self, w: torch.Tensor, hessian: torch.Tensor, mask, bits: int):
        raise NotImplementedError

    def apply_stacked(self, layers: list, stats) -> list | None:
        """`apply` on Linears that read one input (q/k/v, gate/up), from one `quantize_slot` on their
        stacked rows: the same codes, grids and permutation as one `apply` per layer, when the quantizer
        is `row_separable` and every layer is one float dense term without input operations (else None).
        Returns ``[(layer, info), ...]`` in the order of `layers`."""
        if not self.row_separable or len(layers) < 2 or not self._matches("dense"):
            return None
        for layer in layers:
            term = layer.terms[0] if len(layer.terms) == 1 else None
            if (layer.input_ops or not isinstance(term, Dense) or not isinstance(term.a, torch.Tensor)
                    or not term.a.is_floating_point()):
                return None
        bits = {self.resolve_bits(layer.spec()) for layer in layers}
        if len(bits) != 1:
            return None
        bits = bits.pop()
        sources = [layer.terms[0].a for layer in layers]
        qt = self.quantize_slot(torch.cat([materialize(a, torch.float32) for a in sources]), stats.gram, None, bits)
        out, start = [], 0
        for layer, source in zip(layers, sources):
            end = start + source.shape[0]
            part = QTensor(qt.codes[start:end].clone(), qt.scale[start:end].clone(),
                           None if qt.zero is None else qt.zero[start:end].clone(), qt.spec, qt.perm, source)
            out.append((layer.with_terms([layer.terms[0].replace(a=part)]),
                        {"bits": bits, "group_size": self.group_size, "symmetric": self.symmetric}))
            start = end
        return out


def _replace_spec(term, slots: dict):
    from dataclasses import replace
    return replace(term, **slots)


def slot_hessians(term, gram: torch.Tensor):
    """(slot, hessian_fn) for each float slot, in the order they must be quantized.

    ``hessian_fn(done)`` returns the Gram matrix of that slot's inputs given the slots already
    quantized (`done`): the layer's input Gram for a dense/sparse matrix and for V; for U, the Gram of
    the rank-space activations z = diag(d) V̂ x, i.e. (dV̂) H (dV̂)ᵀ with V̂ as already quantized. Without a
    Gram (`gram` None: a statistic-free quantizer run without calibration) every Hessian is None.
    """
    if gram is None:
        return [(slot, lambda done: None) for slot in (("v", "u") if isinstance(term, LowRank) else term.slots())]
    if isinstance(term, LowRank):
        def u_hessian(done):
            v = done.get("v", term.v)
            vd = materialize(v, torch.float32).to(gram.device)
            if term.d is not None:
                vd = term.d.float().to(gram.device).unsqueeze(1) * vd
            return vd @ gram @ vd.T
        return [("v", lambda done: gram), ("u", u_hessian)]
    return [(slot, lambda done: gram) for slot in term.slots()]
