"""QER: quantize W, then add a float low-rank term for the quantization error (METHODS §4.8).

LQER (Zhang et al., ICML 2024; ChengZhang-98/lqer), L²QER (same paper) and QERA (Zhang et al., ICLR 2025;
ChengZhang-98/QERA) share one recipe: Q = Q(W) with RTN or GPTQ, E = W − Q, and the rank-k truncation of
E·S mapped back (built from U_kᵀ E, with no solve with S), stored as ``[Dense(QTensor), LowRank(A, B)]``.
`scaling` chooses S: ``none`` (LQER), ``diag`` (L²QER) or ``exact`` (QERA, S = H^{1/2}); the aliases
``lqer``, ``l2qer`` and ``qera`` fix it.

Method notes: docs/methods/qer.md

Example::

    steps:
      - qer: {bits: 3, group_size: 32, rank: 4, scaling: exact}
      - gptq: {bits: 8, group_size: 64, target: lowrank}      # then quantize the factors (as the references)
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...algebra.spec import LinearSpec, LowRankSpec, TensorSpec
from ...algebra.terms import LowRank, as_float
from ...core.errors import IllegalStep
from ...core.linalg import PRECISIONS
from ...runtime.linear import CompressedLinear
from ..base import Technique, register
from ..budget import budget_bytes, largest_within
from ..fields import ScaleDtype, only_with, setting
from ..lowrank.common import projected_factors
from ..quant.gptq import GPTQ
from ..quant.rtn import RTN

REFERENCE_CLAMP = 1e-4  # L²QER reference SCALE_CLAMP_MIN
GPTQ_ONLY = ("act_order", "static_groups", "percdamp", "blocksize")


# -- the math ----------------------------------------------------------------------------------------

def diag_scale(stat: torch.Tensor, clamp: float = REFERENCE_CLAMP) -> torch.Tensor:
    """The L²QER reference's normalisation: s = max(stat, clamp) / √(min s · max s)."""
    s = stat.to(torch.float32).clamp_min(clamp)
    return s / torch.sqrt(s.min() * s.max())


def gram_sqrt(gram: torch.Tensor, eig_floor: float = 0.0) -> tuple[torch.Tensor, dict]:
    """(R, info): the symmetric square root R = H^{1/2} (fp64, on H's device) by an eigendecomposition.

    Eigenvalues below ``eig_floor`` · λ_max (never below 0) are raised to that floor before the square
    root. ``info`` records how many eigenvalues were raised and the smallest one relative to λ_max.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix; got shape {tuple(gram.shape)}")
    if not eig_floor >= 0:
        raise ValueError(f"eig_floor={eig_floor} is not allowed; allowed: a number >= 0")
    h = gram.to(torch.float64)
    lam, vec = torch.linalg.eigh((h + h.T) / 2)
    top = float(lam[-1]) if lam.numel() else 0.0
    floor = eig_floor * top if top > 0 else 0.0
    low = lam < floor
    root = torch.sqrt(torch.where(low, torch.full_like(lam, floor), lam))
    info = {"eig_clamped": int(low.sum()), "eig_floor_value": floor,
            "eig_min_relative": float(lam[0]) / top if top > 0 else 0.0}
    return (vec * root.unsqueeze(0)) @ vec.T, info


def residual_factors(e: torch.Tensor, scale: torch.Tensor | None, rank: int, sigma_split: str = "sqrt",
                     dtype=torch.float32):
    """(A [m, k], B [k, n], singular values of E·S, n_null) with A B = the rank-k truncation of E·S mapped
    back by S⁻¹; n_null counts kept directions with σ numerically zero (their factors are zero).

    ``scale`` is None (S = I, LQER), a vector [n] (S = diag(scale), L²QER / QERA-diag) or a matrix [n, n]
    (S = R, QERA-exact). The product equals U_k U_kᵀ E, computed without S⁻¹.
    """
    e = e.to(dtype)
    if scale is None:
        es = e
    elif scale.dim() == 1:
        es = e * scale.to(e.device, dtype).unsqueeze(0)
    else:
        es = e @ scale.to(e.device, dtype)
    u, s, _ = torch.linalg.svd(es, full_matrices=False)
    a, b, n_null = projected_factors(u[:, :rank], s[:rank], e, sigma_split)
    return a, b, s, n_null


# -- the handler -------------------------------------------------------------------------------------

@register
class QER(Technique):
    name: ClassVar[str] = "qer"
    family: ClassVar[str] = "joint"
    summary: ClassVar[str] = "quantize (RTN/GPTQ), then a float low-rank term for the residual W − Q(W)"
    ratio_replaces: ClassVar[tuple[str, ...]] = ("rank",)

    scaling: Literal["none", "diag", "exact"] = Field(
        "exact", description="input scaling of the residual SVD: none (LQER), diag (L²QER), exact (QERA, H^{1/2})")
    diag_stat: Literal["abs_mean", "rms"] = Field(
        "abs_mean", description="diag scaling statistic: E|x| (L²QER reference) or sqrt(E[x²]) (QERA diag)")
    diag_clamp: float = Field(REFERENCE_CLAMP, gt=0, description="diag: lower clamp of the statistic (reference 1e-4)")
    eig_floor: float = Field(0.0, ge=0, description="exact: eigenvalues of H below eig_floor·λ_max are raised to it "
                             "(0 = only negative ones; recorded in info)")
    quantizer: Literal["rtn", "gptq"] = Field("rtn", description="how the dense weight is quantized")
    bits: int = setting("bits", doc="bits per weight code of the quantized dense term")
    group_size: int | None = setting("group_size")
    symmetric: bool = setting("symmetric")
    scale_dtype: ScaleDtype = setting("scale_dtype")
    act_order: bool = setting("act_order", when="gptq only")
    static_groups: bool = setting("static_groups", when="gptq only")
    percdamp: float = setting("percdamp", when="gptq only")
    blocksize: int = setting("blocksize", when="gptq only")
    rank: int | None = Field(None, ge=0, description="rank of the residual term (0 = plain quantization)")
    ratio: float | None = Field(None, gt=0.0, le=1.0, description="fraction of the Linear's fp16 bytes to keep "
                                "(quantized dense + factors); picks the largest rank that fits")
    sigma_split: Literal["sqrt", "u", "v"] = Field("sqrt", description="where Σ goes: √Σ on both factors, all in "
                                                   "U (the references' output-side factor) or all in V")
    precision: Literal["fp32", "fp64"] = Field("fp32", description="dtype of the residual SVD")

    @model_validator(mode="after")
    def _check_fields(self):
        if (self.rank is None) == (self.ratio is None):
            raise ValueError(f"give exactly one of rank, ratio (got rank={self.rank}, ratio={self.ratio})")
        only_with(self, GPTQ_ONLY, self.quantizer == "gptq",
                  f"applies to quantizer='gptq' only; got quantizer={self.quantizer!r}")
        return self

    def quantize_step(self) -> RTN | GPTQ:
        """The project's own quantizer config for the dense term (its plan and apply are reused as is)."""
        grid = dict(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric,
                    scale_dtype=self.scale_dtype, target="dense")
        if self.quantizer == "rtn":
            return RTN(**grid)
        return GPTQ(**grid, **{f: getattr(self, f) for f in GPTQ_ONLY})

    # -- typing and costing --------------------------------------------------------------------
    def _float_dtype(self, spec: LinearSpec) -> str:
        a = self.single_dense(spec).a
        if a.quantized:
            raise IllegalStep(f"{self.name} quantizes a float matrix; the dense term is already quantized "
                              f"({a.describe()})")
        return a.dtype

    def spec_for(self, spec: LinearSpec, rank: int) -> LinearSpec:
        dtype = self._float_dtype(spec)
        quantized = self.quantize_step().plan(spec)
        if rank == 0:
            return quantized
        factors = LowRankSpec(TensorSpec(spec.out_features, rank, dtype), TensorSpec(rank, spec.in_features, dtype))
        return quantized.with_terms([*quantized.terms, factors])

    def resolve_rank(self, spec: LinearSpec) -> int:
        full = min(spec.out_features, spec.in_features)
        if self.ratio is not None:
            return largest_within(budget_bytes(spec, self.ratio), 0, full,
                                  lambda k: self.spec_for(spec, k).nbytes(), "rank")
        if self.rank > full:
            raise IllegalStep(f"rank={self.rank} exceeds min(out_features, in_features) = {full}")
        cost, dense = self.spec_for(spec, self.rank).nbytes(), spec.nbytes()
        if cost > dense:
            raise IllegalStep(f"rank={self.rank} on {self.bits}-bit codes costs {cost} bytes, more than the "
                              f"float input's {dense} bytes")
        return self.rank

    def plan(self, spec: LinearSpec) -> LinearSpec:
        return self.spec_for(spec, self.resolve_rank(spec))

    # -- the work ------------------------------------------------------------------------------
    def input_scale(self, stats) -> tuple[torch.Tensor | None, dict]:
        """S for the residual SVD: None, a diagonal [n] or H^{1/2} [n, n], and what was done to build it."""
        if self.scaling == "none":
            return None, {}
        if self.scaling == "diag":
            stat = stats.abs_mean if self.diag_stat == "abs_mean" else stats.sq_mean.clamp_min(0).sqrt()
            clamped = int((stat < self.diag_clamp).sum())
            return diag_scale(stat, self.diag_clamp), {"diag_stat": self.diag_stat, "diag_clamped": clamped}
        return gram_sqrt(stats.gram, self.eig_floor)

    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        rank = self.resolve_rank(spec)
        dtype = self._float_dtype(spec)
        quantized, qinfo = self.quantize_step().apply(layer, stats)
        info = {"scaling": self.scaling, "quantizer": self.quantizer, **qinfo, "rank": rank}
        if rank > 0:
            (qdense,) = quantized.terms
            device = stats.gram.device
            w = layer.terms[0].weight(torch.float32).to(device)
            e = w - qdense.weight(torch.float32).to(device)
            scale, sinfo = self.input_scale(stats)
            a, b, s, n_null = residual_factors(e, scale, rank, self.sigma_split, PRECISIONS[self.precision])
            energy = s.double() ** 2
            total = float(energy.sum())
            info.update(sinfo, residual_energy_kept=float(energy[:rank].sum()) / total if total > 0 else 1.0,
                        residual_null_directions=n_null)
            quantized = layer.with_terms([qdense, LowRank(as_float(a, dtype), as_float(b, dtype))])
        info["ratio"] = quantized.spec().nbytes() / spec.dense_fp16_nbytes()
        return quantized, info


@register
class LQER(QER):
    name: ClassVar[str] = "lqer"
    summary: ClassVar[str] = "QER with a plain SVD of the residual (LQER)"

    scaling: Literal["none"] = Field("none", description="fixed: plain SVD of W − Q(W)")


@register
class L2QER(QER):
    name: ClassVar[str] = "l2qer"
    summary: ClassVar[str] = "QER with the residual scaled by a per-channel activation statistic (L²QER)"

    scaling: Literal["diag"] = Field("diag", description="fixed: diagonal activation scaling")


@register
class QERA(QER):
    name: ClassVar[str] = "qera"
    summary: ClassVar[str] = "QER with the residual whitened by E[x xᵀ]^{1/2}: layer-optimal (QERA)"

    scaling: Literal["exact"] = Field("exact", description="fixed: S = E[x xᵀ]^{1/2}")
