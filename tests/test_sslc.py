"""SSLC and OATS (joint sparse + low-rank): properties that fail when the math or the costing is wrong."""

import pytest
import torch
from helpers import compress_as_checked, layer_problem, objective, tiny_llama, windows
from helpers import run_technique as run

import lmcompose.techniques.joint.sslc  # noqa: F401  (registers sslc and oats)
from lmcompose.algebra import Dense, LowRank, QTensor, QuantSpec, Sparse, quantize_rtn
from lmcompose.algebra.spec import LinearSpec, SparseSpec
from lmcompose.core.errors import IllegalStep
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.joint.sslc import (
    channel_scale,
    salience,
    sslc_decompose,
    topk_mask,
)
from lmcompose.techniques.registry import get_technique

M, N = 48, 128


def structured_problem(seed=0, rank=3, density=0.04, noise=0.02):
    """A weight that is low rank + sparse + a little noise, and the Gram of correlated outlier inputs."""
    _, stats = layer_problem(seed)
    g = torch.Generator().manual_seed(seed + 100)
    low = torch.randn(M, rank, generator=g) @ torch.randn(rank, N, generator=g) / rank ** 0.5
    spikes = 3 * torch.randn(M, N, generator=g) * (torch.rand(M, N, generator=g) < density)
    return low + spikes + noise * torch.randn(M, N, generator=g), stats


def rel(w, w_hat, gram):
    return objective(w, w_hat, gram) / objective(w, torch.zeros_like(w), gram)


# -- costing -----------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [dict(ratio=0.3), dict(ratio=0.5, rank_fraction=0.4), dict(ratio=0.6, rank=10),
                                    dict(ratio=0.5, scope="matrix"), dict(sparsity=0.5, rank=8),
                                    dict(sparsity=0.7, rank=4, scope="matrix", salience="obs"),
                                    dict(ratio=0.5, protect_values="weight", solver="bilateral")])
def test_plan_is_exactly_what_apply_produces(params, device):
    w, stats = layer_problem(device=device)
    new, info = run("sslc", [Dense(w.half())], stats, **params)   # run() asserts new.spec() == plan
    sparse, lowrank = new.terms
    assert isinstance(sparse, Sparse) and isinstance(lowrank, LowRank)
    assert info["nnz"] == int(sparse.mask.sum()) and info["rank"] == lowrank.spec().rank
    if params.get("scope", "row") == "row":   # per-row group: exactly k kept in every row
        assert (sparse.mask.sum(1) == info["nnz"] // M).all()
    if "sparsity" in params:
        per = N if params.get("scope", "row") == "row" else M * N
        assert info["nnz"] == (per - int(per * params["sparsity"])) * (M if per == N else 1)


def test_plan_with_bias_equals_apply():
    w, stats = layer_problem()
    layer = CompressedLinear(N, M, [Dense(w.half())], bias=torch.randn(M).half())
    cfg = get_technique("sslc")(ratio=0.5)
    new, _ = cfg.apply(layer, stats)
    assert new.spec() == cfg.plan(layer.spec()) and new.bias_value is not None


@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.5, 0.8])
@pytest.mark.parametrize("kappa", [0.1, 0.25, 0.5])
def test_bytes_fit_the_ratio_tightly_and_rank_follows_oats(ratio, kappa):
    spec = LinearSpec.dense(M, N)
    cfg = get_technique("sslc")(ratio=ratio, rank_fraction=kappa)
    if int(kappa * ratio * M * N / (M + N)) == 0:
        with pytest.raises(IllegalStep, match="rank_fraction"):
            cfg.plan(spec)
        return
    planned = cfg.plan(spec)
    budget = ratio * spec.dense_fp16_nbytes()
    sparse, lowrank = planned.terms
    assert planned.nbytes() <= budget
    assert lowrank.rank == int(kappa * ratio * M * N / (M + N))      # OATS: r = ⌊κ(1−s)·mn/(m+n)⌋ for fp16
    one_more_per_row = planned.with_terms([SparseSpec(sparse.values, sparse.nnz + M), lowrank])
    assert one_more_per_row.nbytes() > budget                          # the sparse term takes the rest


def nm_groups(mask, m=4):
    return mask.reshape(mask.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("name", ["sslc", "oats"])
@pytest.mark.parametrize("params", [dict(pattern="2:4", ratio=0.7), dict(pattern="2:4", rank=6),
                                    dict(pattern="1:4", ratio=0.5, protect=0.05, salience="obs")])
def test_nm_pattern_holds_and_the_rank_takes_the_rest_of_the_bytes(name, params):
    w, stats = layer_problem()
    new, info = run(name, [Dense(w.half())], stats, **params)  # run() asserts new.spec() == plan
    sparse, lowrank = new.terms
    n_keep = int(params["pattern"][0])
    assert sparse.spec().pattern == params["pattern"] and (nm_groups(sparse.mask) == n_keep).all()
    assert info["nnz"] == M * N * n_keep // 4 and info["pattern"] == params["pattern"]
    if "ratio" in params:  # the largest rank whose bytes fit beside the fixed N:M term
        budget = params["ratio"] * 2 * M * N
        assert new.nbytes() <= budget
        one_more = LinearSpec.dense(M, N).with_terms([sparse.spec(), LowRank(
            torch.zeros(M, lowrank.spec().rank + 1).half(), torch.zeros(lowrank.spec().rank + 1, N).half()).spec()])
        assert one_more.nbytes() > budget
    else:
        assert lowrank.spec().rank == params["rank"]


def test_nm_keeps_the_protected_weights_that_fit_their_group():
    w, stats = layer_problem()
    new, info = run("sslc", [Dense(w.half())], stats, pattern="2:4", ratio=0.7, protect=0.05)
    protected = topk_mask(salience(w.half().float(), stats.gram), int(0.05 * N), "row")
    sparse = new.terms[0]
    fits = (nm_groups(protected) <= 2).repeat_interleave(4, dim=1)  # groups with at most N protected entries
    assert sparse.mask[protected & fits].all()
    assert info["protected"] == int((protected & sparse.mask).sum()) >= int((protected & fits).sum())


def test_nm_error_falls_as_the_ratio_grows_and_the_alternation_never_increases_it():
    w, stats = layer_problem(1)
    errs = [rel(w, run("sslc", [Dense(w.half())], stats, pattern="2:4", ratio=r)[0].to_dense(), stats.gram)
            for r in (0.6, 0.7, 0.8, 0.95)]
    assert errs == sorted(errs, reverse=True)
    w, stats = structured_problem(noise=0.3)
    wt = w * channel_scale(stats.sq_mean).unsqueeze(0)
    fit = sslc_decompose(wt, 4, 0, topk_mask(wt.abs(), 2, "row"), iterations=30, tol=0.0, nm=(2, 4))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(fit["trace"], fit["trace"][1:]))
    assert len(fit["trace"]) > 3 and fit["trace"][-1] < 0.9 * fit["trace"][0]


# -- the math ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ratio", [0.4, 0.6])
def test_beats_wanda_and_svdllm_at_the_same_bytes_on_a_low_rank_plus_sparse_layer(seed, ratio):
    w, stats = structured_problem(seed)
    errs = {}
    for name in ("sslc", "oats", "wanda", "svdllm"):
        new, _ = run(name, [Dense(w.half())], stats, ratio=ratio)
        assert new.nbytes() <= ratio * 2 * M * N
        errs[name] = rel(w, new.to_dense(), stats.gram)
    assert errs["sslc"] < 0.5 * min(errs["wanda"], errs["svdllm"])
    assert errs["oats"] < 0.5 * min(errs["wanda"], errs["svdllm"])


@pytest.mark.parametrize("name", ["sslc", "oats"])
def test_error_falls_as_the_budget_grows(name):
    w, stats = layer_problem(1)
    errs = [rel(w, run(name, [Dense(w.half())], stats, ratio=r)[0].to_dense(), stats.gram)
            for r in (0.2, 0.35, 0.5, 0.7, 0.9)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.2 * errs[0]


@pytest.mark.parametrize("scope", ["row", "matrix"])
@pytest.mark.parametrize("protect_values", ["residual", "weight"])
def test_exact_alternation_never_increases_the_scaled_error(scope, protect_values):
    w, stats = structured_problem(noise=0.3)
    wt = w * channel_scale(stats.sq_mean).unsqueeze(0)
    keep = 40 if scope == "row" else 40 * M
    protected = topk_mask(wt.abs(), 2 if scope == "row" else 2 * M, scope)
    fit = sslc_decompose(wt, 4, keep, protected, scope, iterations=30, tol=0.0, protect_values=protect_values)
    trace = fit["trace"]
    assert len(trace) > 3 and trace[-1] < 0.8 * trace[0]
    assert all(b <= a * (1 + 1e-5) for a, b in zip(trace, trace[1:]))
    # the returned pair is consistent: its error is ‖W̃ − U Uᵀ target − S̃‖²
    l_t = fit["u"] @ (fit["u"].T @ fit["target"])
    assert float((wt - l_t - fit["s"]).double().pow(2).sum()) == pytest.approx(min(trace), rel=1e-4)


@pytest.mark.parametrize("solver", ["randomized", "bilateral"])
def test_randomized_solvers_return_the_best_iterate_and_stop_when_stalled(solver):
    w, stats = structured_problem(noise=0.3)
    wt = w * channel_scale(stats.sq_mean).unsqueeze(0)
    gen = torch.Generator().manual_seed(0)
    fit = sslc_decompose(wt, 4, 40, topk_mask(wt.abs(), 1, "row"), iterations=40, tol=1e-2, solver=solver,
                         generator=gen)
    assert fit["error"] == min(fit["trace"]) and fit["error"] < 0.8 * fit["trace"][0]
    assert fit["iterations"] < 40    # stalled before T
    exact = sslc_decompose(wt, 4, 40, topk_mask(wt.abs(), 1, "row"), iterations=40, tol=1e-2)
    assert fit["error"] < 1.1 * exact["error"]


@pytest.mark.parametrize("form", ["wanda", "obs"])
@pytest.mark.parametrize("protect_values", ["residual", "weight"])
def test_protected_salient_weights_stay_in_s(form, protect_values):
    w, stats = layer_problem()
    w16 = w.half().float()
    new, info = run("sslc", [Dense(w.half())], stats, ratio=0.3, protect=0.05, salience=form,
                    protect_values=protect_values)
    protected = topk_mask(salience(w16, stats.gram, form), int(0.05 * N), "row")
    sparse, _ = new.terms
    assert info["protected"] == int(protected.sum()) == M * int(0.05 * N)
    assert sparse.mask[protected].all()
    if protect_values == "weight":     # S holds the weight itself there
        torch.testing.assert_close(sparse.weight()[protected], w16[protected], rtol=2e-3, atol=1e-3)
    else:                              # Ŵ = S + L reproduces W there
        torch.testing.assert_close(new.to_dense()[protected], w16[protected], rtol=1e-2, atol=5e-3)
        others = ~protected & ~sparse.mask
        assert (new.to_dense() - w16)[protected].abs().mean() < 0.05 * (new.to_dense() - w16)[others].abs().mean()


def test_obs_salience_is_w_squared_over_the_damped_inverse_hessian_diagonal():
    w, stats = layer_problem()
    h = stats.gram.double()
    hinv = torch.linalg.inv(h + 0.01 * h.diagonal().mean() * torch.eye(N, dtype=torch.float64))
    torch.testing.assert_close(salience(w, stats.gram, "obs").double(), w.double() ** 2 / hinv.diagonal(),
                               rtol=1e-3, atol=1e-6)


def test_oats_preset_equals_sslc_with_the_same_settings():
    w, stats = layer_problem(2)
    oats, oinfo = run("oats", [Dense(w.half())], stats, ratio=0.5, rank_fraction=0.3)
    sslc, sinfo = run("sslc", [Dense(w.half())], stats, ratio=0.5, rank_fraction=0.3, solver="exact", protect=0.0,
                      iterations=80, tol=0.0)
    assert oinfo == sinfo
    for a, b in zip(oats.terms, sslc.terms):
        for slot in a.slots():
            assert torch.equal(a.slots()[slot], b.slots()[slot])
    assert torch.equal(oats.terms[0].mask, sslc.terms[0].mask)


def test_finetuning_the_factors_lowers_the_layer_objective_and_keeps_s():
    w, stats = structured_problem(noise=0.3)
    base, _ = run("sslc", [Dense(w.half())], stats, ratio=0.5)
    tuned, info = run("sslc", [Dense(w.half())], stats, ratio=0.5, finetune_steps=30, finetune_lr=3e-3)
    assert torch.equal(tuned.terms[0].values, base.terms[0].values) and torch.equal(tuned.terms[0].mask,
                                                                                    base.terms[0].mask)
    assert info["finetune_error_after"] < info["finetune_error_before"]
    assert objective(w, tuned.to_dense(), stats.gram) < objective(w, base.to_dense(), stats.gram)


def test_dead_input_channels_give_finite_factors():
    w, stats = layer_problem()
    stats.gram[7, :] = 0
    stats.gram[:, 7] = 0
    for form in ("wanda", "obs"):
        new, _ = run("sslc", [Dense(w.half())], stats, ratio=0.5, salience=form)
        assert torch.isfinite(new.to_dense()).all()


# -- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("params, match", [
    (dict(), "exactly one of ratio"), (dict(ratio=0.5, sparsity=0.5), "exactly one of ratio"),
    (dict(sparsity=0.5), "needs rank"), (dict(sparsity=0.5, rank=4, rank_fraction=0.2), "needs rank"),
    (dict(ratio=0.5, rank=4, rank_fraction=0.2), "one of rank"), (dict(ratio=0.5, bogus=1), "bogus"),
    (dict(pattern="2:4", sparsity=0.5), "conflicts with pattern"),
    (dict(pattern="2:4", ratio=0.7, rank_fraction=0.2), "conflicts with pattern"),
    (dict(pattern="2:4"), "exactly one of ratio and rank"), (dict(pattern="2:4", ratio=0.7, rank=4), "exactly one"),
    (dict(pattern="2:4", ratio=0.7, scope="matrix"), "scope"), (dict(pattern="4:2", ratio=0.7), "pattern")])
def test_bad_configs_are_value_errors(params, match):
    with pytest.raises(ValueError, match=match):
        get_technique("sslc")(**params)


def test_illegal_steps_name_the_reason():
    spec = LinearSpec.dense(M, N)
    with pytest.raises(IllegalStep, match="protect"):
        get_technique("sslc")(ratio=0.2, protect=0.4).plan(spec)
    with pytest.raises(IllegalStep, match="exceeds"):
        get_technique("sslc")(sparsity=0.5, rank=64).plan(spec)
    with pytest.raises(IllegalStep, match="more than the dense"):
        get_technique("sslc")(sparsity=0.1, rank=40).plan(spec)
    with pytest.raises(IllegalStep, match="leaves no rank"):
        get_technique("sslc")(pattern="2:4", ratio=0.5).plan(spec)
    with pytest.raises(IllegalStep, match="divisible"):
        get_technique("sslc")(pattern="2:8", ratio=0.7).plan(LinearSpec.dense(M, 36))
    q = CompressedLinear(N, M, [Dense(quantize_rtn(torch.randn(M, N), QuantSpec(4)))]).spec()
    with pytest.raises(IllegalStep, match="quantization grid"):
        get_technique("oats")(ratio=0.5).plan(q)


# -- in a model, then quantized ---------------------------------------------------------------------

@pytest.mark.parametrize("name, extra", [("sslc", {}), ("oats", {}), ("sslc", {"pattern": "2:4", "ratio": 0.7})])
def test_tiny_llama_then_gptq_all_costs_what_recipe_check_says(name, extra):
    model = tiny_llama()
    report, planned = compress_as_checked(model, [{name: {"ratio": 0.6, "iterations": 10, **extra}},
                                                  {"gptq": {"bits": 4, "group_size": 32, "target": "all"}}],
                                          windows(4, 16))
    layers = [m for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == len(planned.compressed) == 14
    for layer in layers:
        sparse, lowrank = layer.terms
        assert isinstance(sparse.values, QTensor) and isinstance(lowrank.u, QTensor) and isinstance(lowrank.v, QTensor)
        assert (layer.to_dense() - lowrank.weight())[~sparse.mask].abs().max() == 0  # the mask survived
        if extra:
            assert sparse.spec().pattern == "2:4" and (nm_groups(sparse.mask) == 2).all()
    assert all(0 < l.rel_error < 0.5 for l in report.layers)
