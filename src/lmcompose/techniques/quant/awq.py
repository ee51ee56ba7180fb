"""AWQ: the activation-aware scale search (Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ:
Activation-aware Weight Quantization for On-Device LLM Compression and Acceleration", MLSys 2024;
reference code mit-han-lab/llm-awq, ``auto_scale``, and ``auto_clip`` for the optional clipping).

For each group of Linears that read one input (q/k/v, gate/up, down, o), the input channels are scaled
by s = mean|x|^α, normalised by √(max s · min s); α runs over a grid in [0, 1) and is kept where the
group's weights W·diag(s), rounded on the grid of the quantizer that follows and divided back by s, give
the lowest output error Σ_l tr(ΔW_l H ΔW_lᵀ) (H = E[x xᵀ]). α = 0 (s = 1) is a candidate, so the group
never ends worse than plain RTN on that grid. The scale is then folded exactly: the producer of the input
(a norm, or the Linear before) is multiplied by 1/s and the Linears store W·diag(s) as float weights.
This step quantizes nothing: `rtn` or `gptq` follows it.

Method notes: docs/methods/awq.md

Example::

    steps:
      - awq: {bits: 3, group_size: 64}
      - gptq: {bits: 3, group_size: 64}
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ...algebra.ops import InputScale, InputScaleSpec
from ...algebra.quant import QuantSpec, quantize_rtn
from ...algebra.spec import LinearSpec
from ...algebra.terms import Dense, as_float
from ...core.dtypes import dtype_name
from ...core.errors import IllegalStep
from ..apply import GroupResult
from ..base import Technique, register
from ..fields import ScaleDtype, only_with, setting
from ..joint.qer import diag_scale

SCALE_CLAMP = 1e-4  # the reference clamps mean|x|^α at 1e-4 before normalising


def awq_scale(abs_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference's s for one α: mean|x|^α clamped at 1e-4, divided by √(max s · min s). α = 0 gives 1."""
    return diag_scale(abs_mean.float().pow(alpha), SCALE_CLAMP)


def rtn_roundtrip(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """W rounded to nearest on the grid `spec` and dequantized (fp32)."""
    return quantize_rtn(w, spec).dequantize(torch.float32)


def _objective(dw: torch.Tensor, gram: torch.Tensor) -> float:
    return float(((dw @ gram) * dw).double().sum())


def scaled_rtn_loss(w: torch.Tensor, s: torch.Tensor, gram: torch.Tensor, spec: QuantSpec) -> float:
    """tr(ΔW H ΔWᵀ) for ΔW = W − Q(W·diag(s))·diag(1/s): the output error of RTN after scaling by s."""
    return _objective(w - rtn_roundtrip(w * s, spec) / s, gram)


def search_scale(w: torch.Tensor, abs_mean: torch.Tensor, gram: torch.Tensor, spec: QuantSpec,
                 grid: int = 20) -> tuple[float, torch.Tensor, list[float]]:
    """(α, s, losses): the α of ``i / grid`` (i = 0 … grid−1) whose scale gives the lowest `scaled_rtn_loss`
    of `w` (the group's weights stacked by rows: they share one input, so their losses add), its scale, and
    the loss of every α. Ties keep the smaller α, so α = 0 (plain RTN) wins unless a scale helps."""
    losses = [scaled_rtn_loss(w, awq_scale(abs_mean, i / grid), gram, spec) for i in range(grid)]
    best = min(range(grid), key=lambda i: (losses[i], i))
    return best / grid, awq_scale(abs_mean, best / grid), losses


def _column_groups(cols: int, group_size: int | None) -> list[slice]:
    g = group_size or cols
    return [slice(k, min(k + g, cols)) for k in range(0, cols, g)]


def clip_search(w: torch.Tensor, gram: torch.Tensor, spec: QuantSpec, grid: int = 20,
                max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's ``auto_clip``: (clipped W, ratio per row and group). Each row's group of input columns is clamped to
    ±r·max|w| for the r of ``1 − i/grid`` (i < max_shrink·grid) with the lowest output error of that group,
    w_g − Q(clamp(w_g)) weighed by the group's diagonal block of the Gram (the reference's per-group output on
    sampled tokens, here exact). r = 1 (no clipping) is a candidate."""
    groups = _column_groups(w.shape[1], spec.group_size)
    absmax = torch.stack([w[:, g].abs().amax(1) for g in groups], 1)  # [rows, groups]
    width = torch.tensor([g.stop - g.start for g in groups], device=w.device)
    best_err = torch.full_like(absmax, float("inf"), dtype=torch.float64)
    best = torch.ones_like(absmax)
    for i in range(max(1, int(max_shrink * grid))):
        r = 1 - i / grid
        bound = (absmax * r).repeat_interleave(width, 1)
        dw = w - rtn_roundtrip(torch.maximum(torch.minimum(w, bound), -bound), spec)
        err = torch.stack([((dw[:, g] @ gram[g, g]) * dw[:, g]).double().sum(1) for g in groups], 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    bound = (absmax * best).repeat_interleave(width, 1)
    return torch.maximum(torch.minimum(w, bound), -bound), best


@register
class AWQ(Technique):
    """Method notes: docs/methods/awq.md"""

    name: ClassVar[str] = "awq"
    family: ClassVar[str] = "transform"  # changes the basis of the weights, stores what it was given
    summary: ClassVar[str] = ("activation-aware per-channel scales, searched for the grid of the quantizer that "
                              "follows and folded into the input's producer (AWQ)")
    unit: ClassVar[str] = "group"

    bits: int = setting("bits", doc="bits of the grid the scales are searched for: the following quantizer's")
    group_size: int | None = setting("group_size")
    symmetric: bool = setting("symmetric")
    scale_dtype: ScaleDtype = setting("scale_dtype")
    grid: int = Field(20, ge=1, description="α runs over i/grid, i = 0 … grid−1 (the reference's n_grid = 20)")
    loss: Literal["layer"] = Field("layer", description="what α minimises: 'layer', the group's Linears' output "
                                   "error from the Gram (the reference measures the parent module's output)")
    store_diagonal: tuple[str, ...] = Field(
        (), description="globs of Linears scaled even where no producer can absorb the scale (o_proj under "
        "grouped-query attention): they store the diagonal 1/s as an input operation, counted in their bytes")
    clip: bool = Field(False, description="AWQ's auto_clip: clamp each row's group of weights to the shrunk "
                       "max-abs with the lowest output error on the grid")
    clip_grid: int = Field(20, ge=1, description="clip: shrink ratios 1 − i/clip_grid")
    max_shrink: float = Field(0.5, gt=0.0, lt=1.0, description="clip: the largest shrink (i < max_shrink·clip_grid)")
    clip_exclude: tuple[str, ...] = Field(
        ("*q_*", "*k_*"), description="clip: globs of Linears not clipped (the reference skips names containing "
        "'q_' or 'k_': the queries and keys, whose errors meet in q·kᵀ)")

    @model_validator(mode="after")
    def _clip_fields(self):
        only_with(self, ("clip_grid", "max_shrink", "clip_exclude"), self.clip, "needs clip: true")
        return self

    # -- capabilities --------------------------------------------------------------------------
    @property
    def prepares_grid(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric, self.scale_dtype)

    def stores_diagonal(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.store_diagonal)

    def _clips(self, name: str) -> bool:
        return self.clip and not any(fnmatchcase(name, p) for p in self.clip_exclude)

    # -- typing --------------------------------------------------------------------------------
    def plan(self, spec: LinearSpec) -> LinearSpec:
        return self.plan_for("", spec)

    def plan_for(self, name: str, spec: LinearSpec) -> LinearSpec:
        if spec.input_ops:
            raise IllegalStep(f"{self.name} scales the input channels its terms multiply, and this Linear has input "
                              "operations before its terms; exclude it")
        dense = self.single_dense(spec)
        if dense.a.quantized:
            raise IllegalStep(f"{self.name} searches scales on float weights for the quantizer that follows it, and "
                              f"this Linear is already quantized ({dense.describe()}): put {self.name} before the "
                              "quantizer")
        if self.stores_diagonal(name):
            return spec.with_input_ops((InputScaleSpec(spec.in_features, dense.a.dtype),))
        return spec

    # -- the work ------------------------------------------------------------------------------
    def apply(self, layer, stats):
        raise NotImplementedError(f"{self.name} scales a group of Linears through the producer of their input: it "
                                  "runs in the sequential pipeline (unit 'group'), not on one Linear alone")

    def apply_group(self, layers: dict, stats, context) -> dict[str, GroupResult]:
        gram, abs_mean = stats.gram.float(), stats.abs_mean.float()
        weights = {n: layer.terms_weight(torch.float32).to(gram.device) for n, layer in layers.items()}
        diagonal = [n for n in layers if self.stores_diagonal(n)]
        folded = [n for n in layers if n not in diagonal]
        out = {}
        for names, how in ((diagonal, "diagonal"), (folded, "fold")):
            if not names:
                continue
            alpha, s, losses = search_scale(torch.cat([weights[n] for n in names]), abs_mean, gram,
                                            self.prepares_grid, self.grid)
            info = {"alpha": alpha, "rtn_loss": losses[0], "awq_loss": min(losses), "scaled": how, "reason": None}
            if alpha > 0 and how == "fold":
                reason = self._no_fold(context, diagonal, 1 / s)
                if reason:
                    s = torch.ones_like(s)
                    info.update(alpha=0.0, awq_loss=losses[0], scaled="none", reason=reason)
            elif alpha == 0 and how == "fold":
                info["scaled"] = "none"
            for n in names:
                out[n] = self._result(layers[n], n, weights[n], s, gram, info, stores=how == "diagonal")
        return out

    def _no_fold(self, context, diagonal: list[str], d: torch.Tensor) -> str | None:
        """Fold d into the group's producer; why not, if it cannot be done."""
        if diagonal:
            return (f"shares its input with {diagonal}, which store the diagonal (store_diagonal): a fold would "
                    "scale their input too")
        if not context.fold(d):
            return (f"no producer absorbs the scale exactly (producer: {context.producer or 'none found'}); the "
                    "reference skips such Linears too; store_diagonal scales them with a stored diagonal")
        return None

    def _result(self, layer, name: str, w: torch.Tensor, s: torch.Tensor, gram: torch.Tensor, info: dict,
                stores: bool) -> GroupResult:
        dtype = dtype_name(layer.terms[0].a.dtype)
        info = dict(info, bits=self.bits, group_size=self.group_size)
        scaled = bool((s != 1).any())
        d = None
        if stores:  # terms W / d with d = 1/s as stored, so that the effective weight rounds only once
            d = as_float(1 / s, dtype)
            s = 1 / d.float()
        ws = w * s
        if self._clips(name):
            ws, ratio = clip_search(ws, gram / torch.outer(s, s), self.prepares_grid, self.clip_grid,
                                    self.max_shrink)
            info.update(clipped=float((ratio < 1).float().mean()), clip_mean_ratio=float(ratio.mean()))
        if not scaled and not self._clips(name) and not stores:
            return GroupResult(layer, info)
        new = layer.with_terms([Dense(as_float(ws, dtype).to(layer.terms[0].a.device))])
        if stores:
            new.input_ops = (InputScale(d.to(layer.terms[0].a.device)),)
            return GroupResult(new, info)
        return GroupResult(new, info, input_scale=(1 / s) if scaled else None)
