"""DAM, the Diagonal Adhesive Method: low rank, then quantization, with a learned diagonal between the
factors (Huang, Wang, Wang, Zhao, Liu, "Break Through the Compression Bottleneck: From Theory to
Practice", Findings of ACL 2026, arXiv 2607.20434; no public code: the reconstruction of METHODS.md §1.4).

W ≈ A B (plain or SVD-LLM SVD) becomes W ≈ (A D)(D⁻¹ B) with D = diag(d); log d is learned with Adam on
the layer error of the fake-quantized factors, then both factors are quantized with GPTQ, and d is folded
into them by default (zero inference cost). ``mode: l_then_q`` and ``mode: q_then_l`` run the two plain
orders from the same code, at the same rank and grid.

Method notes: docs/methods/dam.md

Example::

    steps:
      - dam: {ratio: 0.3, bits: 4, group_size: 64}
      - dam: {rank: 256, bits: 3, mode: l_then_q, decomposition: svdllm}
      - dam: {ratio: 0.25, bits: 4, act_bits: 8, steps: 300, lr: 0.01, fold_d: false}
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...algebra.quant import QuantSpec, quantize_rtn
from ...algebra.spec import LinearSpec, LowRankSpec, TensorSpec
from ...algebra.terms import LowRank, as_float, materialize
from ..base import register
from ..fields import ScaleDtype, only_with, setting
from ..lowrank.common import LowRankConfig
from ..lowrank.svd import SVD
from ..lowrank.svdllm import SVDLLM, whitening_factor
from ..quant.common import slot_hessians
from ..quant.gptq import gptq_quantize

LOG_D_LIMIT = 8.0  # d stays within e^±8 of its geometric mean: finite in fp16 when stored
FIT_ONLY = ("init", "alpha", "steps", "lr", "act_bits", "act_tokens", "seed", "fold_d")


# -- pure functions ------------------------------------------------------------------------------

def _grid_scale(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Differentiable scale per row and group ([rows, n_groups]); the value of ``grid_params`` before
    its rounding to the scale dtype."""
    g = spec.group_size or w.shape[1]
    out = []
    for k in range(spec.n_groups(w.shape[1])):
        block = w[:, k * g:(k + 1) * g]
        xmax, xmin = block.amax(1).clamp_min(0), block.amin(1).clamp_max(0)
        if spec.symmetric:
            xmax = torch.maximum(-xmin, xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        out.append((xmax - xmin) / spec.maxq)
    return torch.stack(out, 1)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """RTN on the shared grid in the forward (bit-identical to ``quantize_rtn(w).dequantize()``); in the
    backward, straight-through rounding plus the step's gradient (LSQ): ∂ŵ/∂w = 1 + (c − w/s)·∂s/∂w,
    with c − w/s the detached rounding residual in code units."""
    qt = quantize_rtn(w.detach(), spec)
    wq = qt.dequantize()
    gidx = qt.group_index()
    step = qt.scale.float()[:, gidx]
    resid = (wq - w.detach()) / step
    s = _grid_scale(w, spec)[:, gidx]
    return wq + (w - w.detach()) + (s - s.detach()) * resid


def smoothquant_diagonal(a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """d_i = rms(z_i)^α / max_j|A_ji|^(1−α), z = B x, rms from the Gram; 1 on dead rank channels."""
    rms = ((b @ gram) * b).sum(1).clamp_min(0).sqrt()
    amax = a.abs().amax(0)
    d = rms ** alpha / amax ** (1 - alpha)
    live = (rms > 0) & (amax > 0) & torch.isfinite(d)
    return torch.where(live, d, torch.ones_like(d))


def surrogate_tokens(gram: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` Gaussian tokens [count, n] with second moment E[x xᵀ] = H (regularised if singular)."""
    chol, _ = whitening_factor(gram)
    xi = torch.randn(count, gram.shape[0], generator=generator, device=gram.device, dtype=torch.float64)
    return (xi @ chol.T).float()


def _diagonal(theta: torch.Tensor) -> torch.Tensor:
    return torch.exp((theta - theta.mean()).clamp(-LOG_D_LIMIT, LOG_D_LIMIT))


def dam_fit(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gram: torch.Tensor, spec: QuantSpec,
            d0: torch.Tensor, steps: int = 200, lr: float = 0.01, tokens: torch.Tensor | None = None,
            act_bits: int | None = None) -> tuple[torch.Tensor, dict]:
    """Learn the diagonal d [r] between A [m, r] and B [r, n] (Adam on log d, from `d0`).

    Loss: tr(ΔW H ΔWᵀ) with ΔW = W − Q(A D)·Q(D⁻¹ B), or, with `act_bits`, the mean over `tokens` of
    ‖W x − Q(A D)·Q_a(Q(D⁻¹ B)·Q_a(x))‖², both relative to the same quantity for ΔW = W. Returns the
    best d seen (iterates, `d0`, and d = 1) and info with the initial, identity and final losses.
    """
    w, a, b, gram = w.float(), a.float(), b.float(), gram.float()
    act = None if act_bits is None else QuantSpec(act_bits, None, symmetric=True, scale_dtype="fp32")
    if act is not None:
        if tokens is None:
            raise ValueError("dam_fit: act_bits needs `tokens` to quantize per token")
        target, xq = tokens @ w.T, fake_quantize(tokens, act)
        ref = float(target.double().pow(2).sum(1).mean())
    else:
        ref = trace = float(((w @ gram) * w).double().sum())
    ref = ref if ref > 0 else 1.0

    if act is None:
        # tr(ΔW H ΔWᵀ) = tr(W H Wᵀ) − 2 tr(U V H Wᵀ) + tr(U (V H Vᵀ) Uᵀ): with H Wᵀ computed once, a step
        # costs r·n·(m + n) multiply-adds instead of the m·n² of forming ΔW H (4–5× fewer at the ranks DAM
        # uses). The expansion cancels in fp32 to ~1e-7 of tr(W H Wᵀ); the losses it reports are exact
        # (`exact_loss` below), the expansion only steers the descent and picks the best iterate.
        hw = gram @ w.T

    def factors(theta):
        d = _diagonal(theta)
        return fake_quantize(a * d, spec), fake_quantize(b / d.unsqueeze(1), spec)

    def loss_of(theta):
        u, v = factors(theta)
        if act is None:
            cross = (u * (v @ hw).T).sum()
            inner = ((u @ ((v @ gram) @ v.T)) * u).sum()
            return (trace - 2 * cross + inner) / ref
        z = fake_quantize(xq @ v.T, act)
        return (target - z @ u.T).pow(2).sum(1).mean() / ref

    def exact_loss(theta) -> float:
        if act is not None:
            return float(loss_of(theta))
        u, v = factors(theta)
        dw = w - u @ v
        return float(((dw @ gram) * dw).sum() / ref)

    with torch.enable_grad():  # the pipeline runs under no_grad
        theta = d0.float().log().clone().requires_grad_(True)
        opt = torch.optim.Adam([theta], lr=lr)
        best_loss, best_theta, best_step = float("inf"), None, -1
        for step in range(steps + 1):
            opt.zero_grad()
            loss = loss_of(theta)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ValueError(f"dam_fit: the fit loss is {value} at step {step}; check the weight and the "
                                 "input Gram for non-finite entries")
            if value < best_loss:
                best_loss, best_theta, best_step = value, theta.detach().clone(), step
            if step < steps:
                loss.backward()
                opt.step()
        with torch.no_grad():
            initial, best_loss = exact_loss(d0.float().log()), exact_loss(best_theta)
            identity = exact_loss(torch.zeros_like(theta))
    if identity < best_loss:
        best_loss, best_theta, best_step = identity, torch.zeros_like(theta.detach()), -1
    d = _diagonal(best_theta)
    return d, {"fit_loss_initial": initial, "fit_loss_identity": identity, "fit_loss_final": best_loss,
               "fit_best_step": best_step, "d_min": float(d.min()), "d_max": float(d.max())}


# -- the technique -------------------------------------------------------------------------------

DECOMPOSITIONS = {"svd": SVD, "svdllm": SVDLLM}


@register
class DAM(LowRankConfig):
    name: ClassVar[str] = "dam"
    family: ClassVar[str] = "joint"
    summary: ClassVar[str] = ("SVD factors with a learned diagonal between them, then GPTQ on both (L→Q); "
                              "also plain L→Q and Q→L (analysis) from the same code")

    mode: Literal["dam", "l_then_q", "q_then_l"] = Field(
        "dam", description="dam: learn d, then quantize the factors; l_then_q: quantize the SVD factors; "
        "q_then_l: SVD of the quantized matrix, float factors (analysis only)")
    decomposition: Literal["svd", "svdllm"] = Field("svd", description="plain truncated SVD (paper) or "
                                                    "SVD-LLM's whitened SVD")
    bits: int = setting("bits", doc="bits per code of U and V")
    group_size: int | None = setting("group_size", doc="input columns per scale (U: rank columns); None = per row")
    symmetric: bool = setting("symmetric", True, doc="symmetric grid (the paper's Eq. 1) or asymmetric min-max")
    scale_dtype: ScaleDtype = setting("scale_dtype")
    quantizer: Literal["gptq", "rtn"] = Field("gptq", description="how the factors are quantized (the fit "
                                              "always uses the RTN grid)")
    act_order: bool = setting("act_order", when="gptq only")
    percdamp: float = setting("percdamp", when="gptq only")
    blocksize: int = setting("blocksize", when="gptq only")
    init: Literal["smoothquant", "ones"] = Field("smoothquant", description="initial d: SmoothQuant on the rank "
                                                 "dimension, or all ones (plain L→Q)")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="SmoothQuant migration strength")
    steps: int = Field(200, ge=0, description="Adam steps on log d (0: keep the best of init and d = 1)")
    lr: float = Field(0.01, gt=0, description="Adam learning rate on log d")
    act_bits: Literal[8] | None = Field(None, description="8: per-token 8-bit fake quantization of both "
                                        "factor inputs during the fit (fit-time only; not stored)")
    act_tokens: int = Field(2048, ge=1, description="act_bits: Gaussian surrogate tokens drawn from the Gram")
    seed: int = Field(0, description="act_bits: seed of the surrogate tokens' generator")
    fold_d: bool = Field(True, description="fold d into the factors before quantization (free), or store "
                                           "d⁻¹ between them in the float dtype (r values)")

    @model_validator(mode="after")
    def _fit_fields(self):
        only_with(self, FIT_ONLY, self.mode == "dam", f"only applies with mode='dam' (got mode={self.mode!r})")
        only_with(self, ("act_tokens", "seed"), self.act_bits is not None, "only applies with act_bits=8")
        only_with(self, ("act_order", "percdamp", "blocksize"), self.quantizer == "gptq",
                  f"only applies with quantizer='gptq' (got quantizer={self.quantizer!r})")
        return self

    @property
    def trains(self) -> bool:
        return self.mode == "dam" and self.steps > 0

    def qspec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.scale_dtype)

    @property
    def stores_perm(self) -> bool:
        return self.quantizer == "gptq" and self.act_order and self.group_size is not None

    # -- typing and costing --------------------------------------------------------------------
    def spec_for(self, spec: LinearSpec, r: int) -> LinearSpec:
        """The deployable layer at rank r: quantized U and V (+ d when not folded). Sets the rank."""
        q, perm = self.qspec(), self.stores_perm
        d = None if self.fold_d else TensorSpec(r, 1, self.float_dtype(spec))
        return spec.with_terms([LowRankSpec(TensorSpec(spec.out_features, r, quant=q, perm=perm),
                                            TensorSpec(r, spec.in_features, quant=q, perm=perm), d)])

    def plan(self, spec: LinearSpec) -> LinearSpec:
        r = self.resolve_rank(spec)
        return super().spec_for(spec, r) if self.mode == "q_then_l" else self.spec_for(spec, r)

    # -- the work ------------------------------------------------------------------------------
    def _quantize(self, w: torch.Tensor, hessian: torch.Tensor):
        if self.quantizer == "rtn":
            return quantize_rtn(w, self.qspec())
        qt, _ = gptq_quantize(w, hessian, self.qspec(), act_order=self.act_order, percdamp=self.percdamp,
                              blocksize=self.blocksize)
        return qt

    def _factorize(self, w: torch.Tensor, stats, rank: int):
        method = DECOMPOSITIONS[self.decomposition](rank=rank, sigma_split=self.sigma_split, precision=self.precision)
        a, b, info = method.factorize(w, stats, rank)
        return a.float(), b.float(), info

    def _fit(self, w, a, b, gram):
        d0 = smoothquant_diagonal(a, b, gram, self.alpha) if self.init == "smoothquant" else torch.ones_like(a[0])
        tokens = None
        if self.act_bits is not None:
            gen = torch.Generator(device=gram.device).manual_seed(self.seed)
            tokens = surrogate_tokens(gram, self.act_tokens, gen)
        return dam_fit(w, a, b, gram, self.qspec(), d0, self.steps, self.lr, tokens, self.act_bits)

    def apply(self, layer, stats):
        spec = layer.spec()
        rank, dtype = self.resolve_rank(spec), self.float_dtype(spec)
        w = layer.terms[0].weight(torch.float32)
        device, gram = w.device, stats.gram.float()
        w = w.to(gram.device)
        info = {"mode": self.mode, "rank": rank, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "quantizer": self.quantizer, "decomposition": self.decomposition}
        if self.mode == "q_then_l":
            w_q = self._quantize(w, gram).dequantize()
            a, b, extra = self._factorize(w_q, stats, rank)
            term = LowRank(as_float(a, dtype), as_float(b, dtype))
            info["analysis_only"] = True
        else:
            a, b, extra = self._factorize(w, stats, rank)
            if self.mode == "dam":
                d, fit = self._fit(w, a, b, gram)
                info.update(fit, init=self.init, act_bits=self.act_bits, fold_d=self.fold_d)
            else:
                d = torch.ones(rank, device=a.device)
            if self.fold_d:
                floats = LowRank(a * d, b / d.unsqueeze(1))
            else:  # the stored diagonal is d⁻¹ as rounded to the float dtype; U absorbs its rounding
                between = as_float(1 / d, dtype)
                floats = LowRank(a / between.float(), b, between)
            quantized = {}
            for slot, hessian in slot_hessians(floats, gram):
                quantized[slot] = self._quantize(materialize(floats.slots()[slot]), hessian(quantized))
            term = floats.replace(**quantized)
        new = layer.with_terms([term.to(device)])
        info.update(extra, ratio=new.spec().nbytes() / spec.dense_fp16_nbytes())
        return new, info
