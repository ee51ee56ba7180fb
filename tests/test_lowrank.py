"""Low-rank techniques (svd, asvd, svdllm): properties that fail when the math or the costing is wrong."""

import pytest
import torch
from helpers import compress_as_checked, layer_problem, objective, tiny_llama, windows
from helpers import run_technique as run

from lmcompose import Recipe
from lmcompose.algebra import Dense, QuantSpec, quantize_rtn
from lmcompose.algebra.spec import LinearSpec
from lmcompose.core.errors import IllegalStep
from lmcompose.core.linalg import randomized_svd
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.lowrank.asvd import asvd_factors, asvd_scale
from lmcompose.techniques.lowrank.svd import truncated_svd
from lmcompose.techniques.lowrank.svdllm import svdllm_factors, whitening_factor
from lmcompose.techniques.registry import get_technique

M, N = 48, 128


def problem(seed=0, m=M, n=N, tokens=1024, dead=(), device=None):
    """A weight and the statistics of correlated inputs with a few outlier channels."""
    return layer_problem(seed, m, n, tokens, mix=0.5, dead=dead, inputs_first=True, weight_dtype=torch.float64,
                         device=device)


# -- the math ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 8, 24, 40])
def test_svdllm_layer_error_is_the_discarded_whitened_energy(rank):
    w, stats = problem()
    chol, added = whitening_factor(stats.gram)
    assert added == 0.0
    a, b, s = svdllm_factors(w, chol, rank, dtype=torch.float64)
    err = objective(w, a @ b, chol @ chol.T)
    assert err == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-6)


def test_svdllm_factors_equal_the_reference_inverse_form():
    """U_k Σ^½ · Σ^½ V_kᵀ S⁻¹ (the reference) equals our U_k Σ^½ · Σ^-½ U_kᵀ W, factor by factor."""
    w, stats = problem()
    chol, _ = whitening_factor(stats.gram)
    u, s, vh = torch.linalg.svd(w.double() @ chol, full_matrices=False)
    k = 20
    ref_b = s[:k].sqrt().unsqueeze(1) * torch.linalg.solve_triangular(chol, vh[:k], upper=False, left=False)
    a, b, _ = svdllm_factors(w, chol, k, dtype=torch.float64)
    torch.testing.assert_close(a, u[:, :k] * s[:k].sqrt(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b, ref_b, rtol=1e-7, atol=1e-10)


def test_asvd_factors_equal_the_reference_division_form():
    w, stats = problem()
    s = asvd_scale(stats.abs_mean.double())
    u, sig, vh = torch.linalg.svd(w.double() * s, full_matrices=False)
    k = 16
    ref = (u[:, :k] * sig[:k]) @ (vh[:k] / s)
    a, b = asvd_factors(w, stats.abs_mean, k, dtype=torch.float64)
    torch.testing.assert_close(a @ b, ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svdllm_is_optimal_for_the_layer_objective(seed):
    w, stats = problem(seed)
    chol, _ = whitening_factor(stats.gram)
    k = 20
    a, b, _ = svdllm_factors(w, chol, k)
    errs = [objective(w, x @ y, stats.gram) for x, y in
            [(a, b), asvd_factors(w, stats.abs_mean, k), truncated_svd(w, k)[:2]]]
    assert errs[0] <= errs[1] and errs[0] <= errs[2]
    assert errs[0] < 0.99 * errs[2]  # strictly better than data-blind SVD on correlated, outlier inputs


def test_plain_svd_frobenius_error_is_the_discarded_energy():
    w, _ = problem()
    for k, dtype in [(5, torch.float32), (30, torch.float64)]:
        a, b, s = truncated_svd(w, k, dtype=dtype)
        tail = float((s[k:].double() ** 2).sum())
        assert float((w.double() - a.double() @ b.double()).pow(2).sum()) == pytest.approx(tail, rel=1e-5)


def test_randomized_asvd_with_oversampling_approaches_exact_and_is_seeded():
    w, stats = problem()
    exact = asvd_factors(w, stats.abs_mean, 8, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(3) for _ in range(2)]
    r1 = asvd_factors(w, stats.abs_mean, 8, solver="randomized", oversample=20, niter=4, generator=gens[0],
                      dtype=torch.float64)
    r2 = asvd_factors(w, stats.abs_mean, 8, solver="randomized", oversample=20, niter=4, generator=gens[1],
                      dtype=torch.float64)
    torch.testing.assert_close(r1[0] @ r1[1], r2[0] @ r2[1])
    e_exact, e_rand = (objective(w, x @ y, stats.gram) for x, y in (exact, r1))
    assert e_exact <= e_rand <= 1.01 * e_exact
    state = torch.get_rng_state()
    randomized_svd(w.double(), 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state()), "must not touch the global RNG"


@pytest.mark.parametrize("split", ["u", "v"])
@pytest.mark.parametrize("name", ["svd", "asvd", "svdllm"])
def test_sigma_split_keeps_the_product(name, split):
    w, stats = problem()
    base, _ = run(name, [Dense(w.float())], stats, rank=12, precision="fp64")
    other, _ = run(name, [Dense(w.float())], stats, rank=12, precision="fp64", sigma_split=split)
    torch.testing.assert_close(other.to_dense(), base.to_dense(), rtol=1e-5, atol=1e-5)
    if name == "svd":  # √Σ on both: column j of U and row j of V both have norm √σ_j
        a, b = base.terms[0].factors()
        torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1), rtol=1e-4, atol=0)


# -- budget and typing -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["svd", "asvd", "svdllm"])
def test_ratio_is_the_largest_rank_that_fits_and_error_falls(name, device):
    w, stats = problem(device=device)
    errs, ranks = [], []
    for ratio in (0.2, 0.4, 0.6, 0.8, 1.0):
        new, info = run(name, [Dense(w.half())], stats, ratio=ratio)
        budget = ratio * 2 * M * N
        r = info["rank"]
        assert new.nbytes() == 2 * r * (M + N) <= budget
        assert 2 * (r + 1) * (M + N) > budget or r == min(M, N)
        assert r == int(ratio * M * N / (M + N))  # the references' rank formula, for fp16 factors
        assert info["ratio"] == pytest.approx(new.nbytes() / (2 * M * N))
        errs.append(objective(w, new.to_dense(), stats.gram))
        ranks.append(r)
    assert ranks == sorted(set(ranks)) and errs == sorted(errs, reverse=True)


def test_fp32_storage_counts_four_bytes_per_factor_entry():
    spec = LinearSpec.dense(M, N, dtype="fp32")
    planned = get_technique("svdllm")(ratio=0.8).plan(spec)
    (term,) = planned.terms
    assert term.u.dtype == "fp32" and planned.nbytes() <= 0.8 * 2 * M * N < planned.nbytes() + 4 * (M + N)


def test_rank_above_break_even_raises_at_check():
    shapes = {"model.layers.0.mlp.up_proj": (M, N)}
    breakeven = M * N // (M + N)  # 34: 2·34·176 = 11968 ≤ 12288 < 2·35·176
    Recipe.from_dict({"steps": [{"svd": {"rank": breakeven}}]}).check(shapes)
    with pytest.raises(IllegalStep, match=rf"rank {breakeven + 1} costs 12320 bytes, more than the dense 12288"):
        Recipe.from_dict({"steps": [{"svdllm": {"rank": breakeven + 1}}]}).check(shapes)
    with pytest.raises(ValueError, match="exactly one of rank, ratio"):
        get_technique("asvd")(rank=4, ratio=0.5)
    with pytest.raises(ValueError, match="exactly one of rank, ratio"):
        get_technique("asvd")()


def test_quantized_input_is_refused_unless_offgrid():
    wq = quantize_rtn(torch.randn(M, N), QuantSpec(4, 32))
    spec = CompressedLinear(N, M, [Dense(wq)]).spec()
    for name in ("svd", "asvd", "svdllm"):
        with pytest.raises(IllegalStep, match="leaves the quantization grid"):
            get_technique(name)(rank=8).plan(spec)
    w, stats = problem()
    new, info = run("svdllm", [Dense(wq)], stats, rank=8, allow_offgrid=True)
    assert info["rank"] == 8 and new.terms[0].spec().u.dtype == "fp16"
    with pytest.raises(IllegalStep, match="single dense term"):
        get_technique("svd")(rank=4).plan(new.spec())  # low-rank of a low-rank term: not a dense input


def test_dead_input_channel_gets_a_recorded_regularisation():
    w, stats = problem(dead=(3, 70))
    assert torch.linalg.cholesky_ex(stats.gram.double())[1] != 0
    new, info = run("svdllm", [Dense(w.half())], stats, rank=16)
    assert info["regularization"] == "eig_shift" and info["regularization_added"] > 0
    assert info["regularization_relative"] == pytest.approx(1e-6, rel=0.5)
    assert torch.isfinite(new.to_dense()).all()
    # the identity holds for the Gram that was whitened, and the dead columns cost nothing
    chol, added = whitening_factor(stats.gram)
    a, b, s = svdllm_factors(w, chol, 16, dtype=torch.float64)
    assert objective(w, a @ b, chol @ chol.T) == pytest.approx(float((s[16:] ** 2).sum()), rel=1e-6)
    assert objective(w, new.to_dense(), stats.gram) < objective(w, truncated_svd(w, 16)[0] @ truncated_svd(w, 16)[1],
                                                                 stats.gram)
    _, info = run("svdllm", [Dense(w.half())], stats, rank=16, regularization="damp", damp=0.01)
    assert info["regularization_added"] == pytest.approx(0.01 * float(stats.gram.double().diagonal().mean()))
    _, info = run("svdllm", [Dense(w.half())], problem()[1], rank=16)
    assert info["regularization_added"] == 0.0  # positive definite: nothing added


def test_fewer_tokens_than_channels_and_rank_beyond_the_data():
    w, stats = problem(tokens=20)  # Gram of rank 20 < 128
    new, info = run("svdllm", [Dense(w.half())], stats, rank=30)
    assert info["regularization_added"] > 0 and torch.isfinite(new.to_dense()).all()
    assert objective(w, new.to_dense(), stats.gram) < 1e-3 * objective(w, torch.zeros_like(w), stats.gram)


# -- through the pipeline ----------------------------------------------------------------------

def test_svdllm_pipeline_on_a_tiny_llama_bytes_as_planned():
    model = tiny_llama()
    report, planned = compress_as_checked(model, [{"svdllm": {"ratio": 0.8}}], windows(4, 16))
    real = sum(m.nbytes() for m in model.modules() if isinstance(m, CompressedLinear))
    assert real == planned.linear_bytes <= 0.8 * planned.linear_dense_bytes
    assert len(report.layers) == 14 and all(l.steps for l in report.layers)
    for l in report.layers:
        (m, n), step = l.shape, l.steps[-1]
        assert step["rank"] == int(0.8 * m * n / (m + n)) and step["regularization_added"] >= 0
        assert 0 < step["rel_error"] < 1
    logits = model(input_ids=windows(1, 8), use_cache=False).logits
    assert torch.isfinite(logits).all()
