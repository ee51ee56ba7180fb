"""SSLC and OATS: W ≈ S + L, a sparse term plus a low-rank term fitted together.

SSLC: Zong et al., "1+1>2: A Synergistic Sparse and Low-Rank Compression Method for LLMs", Findings of
EMNLP 2025, arXiv 2510.26446 (no public code; METHODS §2.3 is a reconstruction). OATS: Zhang & Papyan,
ICLR 2025, stephenqz/OATS (verified, METHODS §4.4). OATS is this code with a preset (`oats`).

On the input-scaled weight W̃ = W·diag(√E[x²]), a rank-r approximation of W̃ − S̃ and a hard threshold of
W̃ − L̃ alternate (block coordinate descent; the best iterate is kept); both terms are then scaled back and
stored as ``[Sparse, LowRank]`` in float, for a later quantize step. Every reading the papers leave open
(budget, comparison group, salience, protected values, solver, pattern) is a config field.

Method notes: docs/methods/sslc.md

Example::

    steps:
      - sslc: {ratio: 0.5}                          # κ = 0.25, 1% protected, randomized SVD, T ≤ 40
      - sslc: {sparsity: 0.5, rank: 128}            # additive reading ("50% + rank 128")
      - oats: {ratio: 0.5, rank_fraction: 0.3}      # exact SVD, no protection, T = 80
      - gptq: {bits: 4, group_size: 128, target: all}
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator

from ...algebra.spec import LinearSpec, LowRankSpec, SparseSpec, TensorSpec
from ...algebra.terms import LowRank, Sparse, as_float
from ...core.errors import IllegalStep
from ...core.linalg import damped_inverse_cholesky, randomized_svd
from ...runtime.linear import CompressedLinear
from ..base import Technique, register
from ..budget import budget_bytes, largest_within
from ..fields import only_with, setting
from ..lowrank.common import projected_factors
from ..prune.common import matrix_topk_mask, nm_mask, parse_pattern, row_topk_mask

log = logging.getLogger(__name__)

Scope = Literal["row", "matrix"]


# -- pure functions ------------------------------------------------------------------------------


def channel_scale(sq_mean: torch.Tensor) -> torch.Tensor:
    """D = √E[x²] per input channel; dead channels (0) get the smallest live value (all dead: 1)."""
    d = sq_mean.float().clamp_min(0).sqrt()
    live = d > 0
    if not live.any():
        return torch.ones_like(d)
    return torch.where(live, d, d[live].min())


def topk_mask(score: torch.Tensor, keep: int, scope: str, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask with the `keep` highest scores per row (scope row) or of the whole matrix, or, given
    `nm` = (N, M), the N highest of every M consecutive columns of each row (`keep` unused)."""
    if nm is not None:
        return nm_mask(score, *nm)
    return row_topk_mask(score, keep) if scope == "row" else matrix_topk_mask(score, keep)


def salience(w: torch.Tensor, gram: torch.Tensor, form: str = "wanda", percdamp: float = 0.01) -> torch.Tensor:
    """Wanda |W_ij|·√E[x_j²], or OBS W_ij² / [H⁻¹]_jj with H damped by percdamp·mean(diag H)."""
    w = w.float()
    if form == "wanda":
        return w.abs() * gram.diagonal().float().clamp_min(0).sqrt().unsqueeze(0)
    if form == "obs":
        dead = gram.diagonal() == 0
        chol, _ = damped_inverse_cholesky(gram.float(), percdamp, dead, layer_shape=tuple(w.shape))
        hinv_diag = (chol ** 2).sum(0)  # H⁻¹ = Uᵀ U with U upper
        return w ** 2 / hinv_diag.unsqueeze(0)
    raise ValueError(f"salience={form!r} is not allowed; allowed: 'wanda', 'obs'")


def low_rank_basis(m: torch.Tensor, rank: int, solver: str = "exact", oversample: int = 5, niter: int = 2,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r [rows, r], σ_r [r]): orthonormal basis and singular values with U_r U_rᵀ M ≈ best rank-r of M."""
    if solver == "exact":
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
    elif solver in ("randomized", "bilateral"):
        q = rank if solver == "bilateral" else min(rank + oversample, *m.shape)
        u, s = randomized_svd(m, q, niter, generator)
    else:
        raise ValueError(f"solver={solver!r} is not allowed; allowed: 'exact', 'randomized', 'bilateral'")
    return u[:, :rank], s[:rank]


def sslc_decompose(wt: torch.Tensor, rank: int, keep: int, protected: torch.Tensor, scope: str = "row",
                   iterations: int = 40, tol: float = 1e-4, protect_values: str = "residual",
                   solver: str = "exact", oversample: int = 5, niter: int = 2,
                   generator: torch.Generator | None = None, nm: tuple[int, int] | None = None) -> dict:
    """Alternate rank-r fits and hard thresholding on the (already scaled) weight `wt` [m, n].

    `keep` counts kept entries per row (scope row) or in the matrix (scope matrix), the `protected`
    mask included; with `nm` = (N, M) the threshold keeps the N largest of every M consecutive columns
    of a row instead (protected entries first, so at most N of them per group survive; the N:M
    projection is the exact minimiser over N:M-sparse S, so the exact solver still never increases the
    error). Returns the best iterate: ``s`` (S̃, zeros off the mask), ``mask``, ``u``, ``sigma``
    and ``target`` (the W̃ − S̃ the rank-r fit was taken of, so L̃ = U Uᵀ target), plus ``trace``
    (‖W̃ − L̃ − S̃‖²_F after each iteration) and ``iterations`` run.
    """
    if protect_values not in ("residual", "weight"):
        raise ValueError(f"protect_values={protect_values!r} is not allowed; allowed: 'residual', 'weight'")
    wt = wt.float()
    fixed = protect_values == "weight"
    s = torch.where(protected, wt, torch.zeros_like(wt)) if fixed else torch.zeros_like(wt)
    best, trace = None, []
    for _ in range(iterations):
        target = wt - s
        u, sigma = low_rank_basis(target, rank, solver, oversample, niter, generator)
        r = wt - u @ (u.T @ target)
        # protected entries rank first (lifted above every |R|), then by |R| among themselves (N:M groups
        # may hold more than N of them); the rest compete by |R|
        score = r.abs()
        mask = topk_mask(torch.where(protected, score + (score.max() + 1), score), keep, scope, nm)
        s = torch.where(mask, torch.where(protected, wt, r) if fixed else r, torch.zeros_like(r))
        err = float((r - s).double().pow(2).sum())
        prev = trace[-1] if trace else None
        trace.append(err)
        if best is None or err < best["error"]:
            best = {"s": s, "mask": mask, "u": u, "sigma": sigma, "target": target, "error": err}
        if prev is not None and prev - err <= tol * prev:
            break
    return {**best, "trace": trace, "iterations": len(trace)}


def finetune_factors(w: torch.Tensor, sparse: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     gram: torch.Tensor, steps: int, lr: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Adam on (A, B) with S frozen, minimising tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), ΔW = W − S − A B; keeps the best."""
    h = gram.float()
    base = (w.float() - sparse.float()).detach()
    norm = float(((w.float() @ h) * w.float()).sum()) or 1.0
    a = a.detach().float().clone().requires_grad_(True)
    b = b.detach().float().clone().requires_grad_(True)
    groups = [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-12))} for p in (a, b)]
    opt = torch.optim.Adam(groups)
    best = (float("inf"), a.detach().clone(), b.detach().clone())
    first = None
    with torch.enable_grad():
        for step in range(steps + 1):
            dw = base - a @ b
            loss = ((dw @ h) * dw).sum() / norm
            value = float(loss.detach())
            first = value if first is None else first
            if value < best[0]:
                best = (value, a.detach().clone(), b.detach().clone())
            if step == steps:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    return best[1], best[2], {"finetune_error_before": first, "finetune_error_after": best[0]}


# -- handler -------------------------------------------------------------------------------------


@register
class SSLC(Technique):
    """Joint sparse + low-rank on the activation-scaled weight (see the module docstring)."""

    name: ClassVar[str] = "sslc"
    family: ClassVar[str] = "joint"
    summary: ClassVar[str] = ("W ≈ S + UV on W·diag(√E[x²]): alternate rank-r fits and hard thresholding, "
                              "top salient weights protected in S")
    ratio_replaces: ClassVar[tuple[str, ...]] = ("rank", "sparsity")

    ratio: float | None = Field(None, gt=0.0, le=1.0, description="total reading: fraction of the Linear's "
                                "fp16 bytes kept by S (values + index) and U, V together")
    sparsity: float | None = Field(None, ge=0.0, lt=1.0, description="additive reading: fraction of S's group "
                                   "set to zero (needs `rank`)")
    rank: int | None = Field(None, ge=1, description="rank of U V (required with sparsity; with ratio it "
                             "replaces rank_fraction; with an N:M pattern, give ratio or rank)")
    rank_fraction: float | None = Field(None, gt=0.0, lt=1.0, description="with ratio: share κ of the byte "
                                        "budget given to U, V (default 0.25, OATS)")
    pattern: str = Field("unstructured", description="S's sparsity pattern: 'unstructured' or 'N:M' (keep N of "
                         "every M inputs of a row, OATS's N:M variant; fixes S, so the budget sets only the rank)")
    scope: Scope = Field("row", description="comparison group of the hard threshold and the protection: "
                         "per output 'row' (OATS, Wanda) or per 'matrix'")
    protect: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of each group kept in S by salience")
    protect_values: Literal["residual", "weight"] = Field(
        "residual", description="protected entries of S hold the residual W̃ − L̃ (Ŵ exact there) or the "
        "weight W̃ itself (L fitted to the rest)")
    salience: Literal["wanda", "obs"] = Field("wanda", description="|W|·√E[x²] (Wanda) or W²/[H⁻¹]_jj (OBS)")
    percdamp: float = setting("percdamp", when="salience 'obs'")
    iterations: int = Field(40, ge=1, description="maximum alternating iterations T")
    tol: float = Field(1e-4, ge=0.0, description="stop when an iteration improves the scaled error by at "
                       "most tol (relative); 0 = run until no improvement or T")
    solver: Literal["randomized", "bilateral", "exact"] = Field(
        "randomized", description="rank-r step: randomized SVD (torch.svd_lowrank's algorithm), bilateral "
        "random projection (GoDec), or exact full SVD")
    oversample: int = Field(5, ge=0, description="randomized: extra basis columns (3BASiL: 5)")
    niter: int = Field(2, ge=0, description="randomized / bilateral: power iterations")
    seed: int = Field(0, description="seed of the solver's own generator")
    finetune_steps: int = Field(0, ge=0, description="Adam steps on U, V with S frozen on tr(ΔW H ΔWᵀ); 0 = off")
    finetune_lr: float = Field(1e-3, gt=0.0, description="fine-tuning learning rate, relative to each factor's RMS")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        parse_pattern(v)
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @model_validator(mode="after")
    def _budget(self):
        if self.nm:
            if self.sparsity is not None or self.rank_fraction is not None:
                given = "sparsity" if self.sparsity is not None else "rank_fraction"
                raise ValueError(f"{given}={getattr(self, given)} conflicts with pattern={self.pattern!r}: an N:M "
                                 "pattern fixes S; give ratio (the rank takes the rest) or rank")
            if (self.ratio is None) == (self.rank is None):
                raise ValueError(f"pattern={self.pattern!r} needs exactly one of ratio and rank; got "
                                 f"ratio={self.ratio}, rank={self.rank}")
            only_with(self, ("scope",), self.nm is None, f"does not apply to pattern={self.pattern!r}: N:M groups "
                      "are M inputs of one row; use scope 'row'")
            return self
        if (self.ratio is None) == (self.sparsity is None):
            raise ValueError(f"give exactly one of ratio (total reading) and sparsity (additive reading, with "
                             f"rank); got ratio={self.ratio}, sparsity={self.sparsity}")
        if self.sparsity is not None and (self.rank is None or self.rank_fraction is not None):
            raise ValueError(f"sparsity={self.sparsity} needs rank and no rank_fraction (got rank={self.rank}, "
                             f"rank_fraction={self.rank_fraction})")
        if self.ratio is not None and self.rank is not None and self.rank_fraction is not None:
            raise ValueError(f"with ratio give one of rank={self.rank} and rank_fraction={self.rank_fraction}")
        return self

    @property
    def trains(self) -> bool:
        return self.finetune_steps > 0

    @property
    def kappa(self) -> float:
        return 0.25 if self.rank_fraction is None else self.rank_fraction

    # -- typing and costing --------------------------------------------------------------------
    def _dtype(self, spec: LinearSpec) -> str:
        a = self.single_dense(spec).a
        if a.quantized:
            raise IllegalStep(f"{self.name} rewrites the weights, which would leave the quantization grid; "
                              "run it before quantizing (then quantize with target: all)")
        return a.dtype

    def _spec(self, spec: LinearSpec, nnz: int, rank: int) -> LinearSpec:
        dtype, m, n = self._dtype(spec), spec.out_features, spec.in_features
        return spec.with_terms([SparseSpec(TensorSpec(m, n, dtype), nnz, *(self.nm or (None, None))),
                                LowRankSpec(TensorSpec(m, rank, dtype), TensorSpec(rank, n, dtype))])

    def resolve(self, spec: LinearSpec) -> tuple[int, int, int]:
        """(rank, kept entries per group, protected entries per group): what `apply` will produce."""
        m, n = spec.out_features, spec.in_features
        per = n if self.scope == "row" else m * n
        groups = m if self.scope == "row" else 1
        full = min(m, n)
        if self.rank is not None and self.rank > full:
            raise IllegalStep(f"rank={self.rank} exceeds min(out_features, in_features) = {full}")
        if self.nm:
            keep, rank = self._nm_budget(spec)
        elif self.sparsity is not None:
            rank, keep = self.rank, per - int(per * self.sparsity)
            cost, dense = self._spec(spec, keep * groups, rank).nbytes(), spec.nbytes()
            if cost > dense:
                raise IllegalStep(f"sparsity={self.sparsity} plus rank={rank} costs {cost} bytes, more than the "
                                  f"dense {dense} bytes")
        else:
            budget = budget_bytes(spec, self.ratio)
            rank = self.rank
            if rank is None:
                bias = spec.bias.nbytes() if spec.bias else 0
                share = self.kappa * (budget - bias)
                try:
                    rank = largest_within(share, 1, full, lambda r: self._spec(spec, 0, r).terms[1].nbytes(), "rank")
                except IllegalStep as err:
                    raise IllegalStep(f"the low-rank share (rank_fraction={self.kappa} of ratio={self.ratio}): "
                                      f"{err}; raise rank_fraction or ratio") from None
            keep = largest_within(budget, 0, per, lambda k: self._spec(spec, k * groups, rank).nbytes(),
                                  f"kept weights (ratio={self.ratio}, rank={rank})")
        protected = int(per * self.protect)
        if protected > keep:
            raise IllegalStep(f"protect={self.protect} protects {protected} entries per {self.scope} but the "
                              f"budget keeps only {keep}; lower protect or raise the budget")
        return rank, keep, protected

    def _nm_budget(self, spec: LinearSpec) -> tuple[int, int]:
        """(kept entries per row, rank) under an N:M pattern: S is fixed, the rank is given or takes the rest."""
        (n_keep, group), m, n = self.nm, spec.out_features, spec.in_features
        if n % group:
            raise IllegalStep(f"pattern {self.pattern} needs in_features divisible by {group}, got {n}")
        keep = n // group * n_keep
        if self.rank is not None:
            cost, dense = self._spec(spec, keep * m, self.rank).nbytes(), spec.nbytes()
            if cost > dense:
                raise IllegalStep(f"pattern {self.pattern} plus rank={self.rank} costs {cost} bytes, more than the "
                                  f"dense {dense} bytes")
            return keep, self.rank
        budget = budget_bytes(spec, self.ratio)
        try:
            rank = largest_within(budget, 1, min(m, n), lambda r: self._spec(spec, keep * m, r).nbytes(), "rank")
        except IllegalStep as err:
            raise IllegalStep(f"ratio={self.ratio} leaves no rank beside the {self.pattern} sparse term: {err}; "
                              "raise ratio") from None
        return keep, rank

    def plan(self, spec: LinearSpec) -> LinearSpec:
        rank, keep, _ = self.resolve(spec)
        return self._spec(spec, keep * (spec.out_features if self.scope == "row" else 1), rank)

    # -- the work ------------------------------------------------------------------------------
    def apply(self, layer: CompressedLinear, stats):
        spec = layer.spec()
        rank, keep, n_protect = self.resolve(spec)
        dtype = self._dtype(spec)
        (dense,) = layer.terms
        device = dense.a.device
        gram = stats.gram
        w = dense.weight(torch.float32).to(gram.device)
        d = channel_scale(gram.diagonal())
        wt = w * d.unsqueeze(0)
        protected = topk_mask(salience(w, gram, self.salience, self.percdamp), n_protect, self.scope)
        gen = None if self.solver == "exact" else torch.Generator(device=w.device).manual_seed(self.seed)
        fit = sslc_decompose(wt, rank, keep, protected, self.scope, self.iterations, self.tol,
                             self.protect_values, self.solver, self.oversample, self.niter, gen, self.nm)
        # unscale: S = S̃ D⁻¹ (same mask); L̃ D⁻¹ = U Σ^½ · Σ^-½ Uᵀ (W̃ − S̃) D⁻¹
        values = as_float(fit["s"] / d.unsqueeze(0), dtype)
        a, b, n_null = projected_factors(fit["u"], fit["sigma"], fit["target"] / d.unsqueeze(0))
        info = {}
        if self.finetune_steps:
            a, b, info = finetune_factors(w, values.float() * fit["mask"], a, b, gram, self.finetune_steps,
                                          self.finetune_lr)
        terms = [Sparse(values.to(device), fit["mask"].to(device), *(self.nm or (None, None))),
                 LowRank(as_float(a, dtype).to(device), as_float(b, dtype).to(device))]
        new = layer.with_terms(terms)
        norm = float(wt.double().pow(2).sum()) or 1.0
        log.debug("%s: %d iterations, scaled error %.3e", self.name, fit["iterations"], fit["error"] / norm)
        return new, {"iterations": fit["iterations"], "scaled_error": fit["error"] / norm, "rank": rank,
                     "nnz": int(fit["mask"].sum()), "protected": int((protected & fit["mask"]).sum()),
                     "null_directions": n_null,
                     "ratio": new.spec().nbytes() / spec.dense_fp16_nbytes(), "solver": self.solver,
                     "pattern": self.pattern,
                     "salience": self.salience, "scope": self.scope, **info}


@register
class OATS(SSLC):
    """OATS (Zhang & Papyan, ICLR 2025): the same alternation with exact SVDs, no protection, T = 80."""

    name: ClassVar[str] = "oats"
    summary: ClassVar[str] = ("W ≈ S + UV on W·diag(√E[x²]): 80 alternations of full-SVD rank-r fits and "
                              "per-row hard thresholding (SSLC preset)")

    protect: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of each group kept in S by salience "
                           "(OATS: none)")
    iterations: int = Field(80, ge=1, description="alternating iterations T (OATS: 80)")
    tol: float = Field(0.0, ge=0.0, description="stop when an iteration improves the scaled error by at most "
                       "tol (relative); 0 = run until no improvement or T")
    solver: Literal["randomized", "bilateral", "exact"] = Field("exact", description="rank-r step (OATS: full SVD)")
