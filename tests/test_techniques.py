"""Every technique: properties that fail when the math is wrong, on synthetic layers and tiny models."""

import pytest
import torch
from helpers import MODELS, tiny_llama, windows

from lmcompose import Recipe, compress
from lmcompose.algebra import Dense, QuantSpec, Sparse, quantize_rtn
from lmcompose.algebra.spec import LinearSpec
from lmcompose.core.errors import IllegalStep
from lmcompose.core.stats import StatsAccumulator
from lmcompose.pipeline.blocks import linear_shapes
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.lowrank.asvd import asvd_factors
from lmcompose.techniques.lowrank.svd import truncated_svd
from lmcompose.techniques.lowrank.svdllm import svdllm_factors, whitening_factor
from lmcompose.techniques.prune.sparsegpt import block_keep_counts, sparsegpt_prune
from lmcompose.techniques.prune.wanda import owl_sparsities, wanda_score
from lmcompose.techniques.quant.gptq import gptq_quantize
from lmcompose.techniques.registry import get_technique, registry


def layer_problem(seed=0, m=48, n=128, tokens=1024):
    """A weight and the Gram of correlated inputs with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.4 * torch.randn(n, n, generator=g) / n ** 0.5
    x = torch.randn(tokens, n, generator=g) @ mix
    x[:, :4] *= 8
    acc = StatsAccumulator(n)
    acc.update(x)
    return torch.randn(m, n, generator=g), acc.result()


def objective(w, w_hat, gram):
    dw = (w - w_hat).double()
    return float(((dw @ gram.double()) * dw).sum())


def run(technique, layer_terms, stats, **params):
    cls = get_technique(technique)
    cfg = cls(**params)
    m, n = layer_terms[0].weight().shape
    layer = CompressedLinear(n, m, layer_terms)
    planned = cfg.plan(layer.spec())
    new, info = cfg.apply(layer, stats)
    assert new.spec() == planned, "plan() must cost exactly what apply() produces"
    return new, info


# -- pruning -----------------------------------------------------------------------------------

def test_wanda_mask_equals_brute_force_per_row_sort():
    w, stats = layer_problem()
    new, _ = run("wanda", [Dense(w.half())], stats, sparsity=0.5)
    score = wanda_score(w.half().float(), stats.sq_mean)
    order = score.argsort(dim=1, stable=True)
    expected = torch.ones_like(score, dtype=torch.bool).scatter_(1, order[:, :64], False)
    assert torch.equal(new.terms[0].mask, expected)


def test_wanda_with_uniform_activations_is_row_magnitude():
    w, stats = layer_problem()
    stats.gram = torch.eye(w.shape[1])
    wanda, _ = run("wanda", [Dense(w.half())], stats, sparsity=0.3)
    mag, _ = run("magnitude", [Dense(w.half())], stats, sparsity=0.3, scope="row")
    assert torch.equal(wanda.terms[0].mask, mag.terms[0].mask)


@pytest.mark.parametrize("technique", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_has_exactly_n_per_group(technique, pattern):
    w, stats = layer_problem()
    n, m = map(int, pattern.split(":"))
    new, _ = run(technique, [Dense(w.half())], stats, pattern=pattern)
    nz = new.to_dense() != 0
    assert (nz.reshape(w.shape[0], -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_beats_magnitude_and_wanda_on_the_layer_objective(seed, sparsity):
    w, stats = layer_problem(seed)
    errs = {}
    for t in ("magnitude", "wanda", "sparsegpt"):
        new, _ = run(t, [Dense(w.half())], stats, sparsity=sparsity, **({"scope": "row"} if t != "sparsegpt" else {}))
        errs[t] = objective(w, new.to_dense(), stats.gram)
    assert errs["sparsegpt"] <= errs["wanda"] <= errs["magnitude"] * 1.0001


def test_sparsegpt_error_falls_with_sparsity_and_is_zero_at_zero():
    w, stats = layer_problem()
    errs = [objective(w, sparsegpt_prune(w, stats.gram, block_keep_counts(48, 128, 128, s))[0], stats.gram)
            for s in (0.0, 0.2, 0.4, 0.6, 0.8)]
    assert errs[0] < 1e-6 * errs[-1] and errs == sorted(errs)


def test_sparsegpt_handles_dead_columns():
    w, stats = layer_problem()
    stats.gram[5, :] = 0
    stats.gram[:, 5] = 0
    out, mask, info = sparsegpt_prune(w, stats.gram, block_keep_counts(48, 128, 128, 0.5))
    assert info["dead_columns"] == 1 and torch.isfinite(out).all() and (out[:, 5] == 0).all()


def test_mask_only_pruners_keep_codes_but_sparsegpt_refuses_quantized_input():
    w, stats = layer_problem()
    q = quantize_rtn(w, QuantSpec(4, 32))
    new, _ = run("wanda", [Dense(q)], stats, sparsity=0.5)
    assert torch.equal(new.terms[0].values.codes, q.codes)
    with pytest.raises(IllegalStep, match="leave the quantization grid"):
        get_technique("sparsegpt")(sparsity=0.5).plan(CompressedLinear(128, 48, [Dense(q)]).spec())


def test_owl_allocation_keeps_the_mean_and_favours_outlier_layers():
    s = owl_sparsities([0.01, 0.05, 0.02, 0.10], target=0.5, lam=0.08)
    assert abs(sum(s) / 4 - 0.5) < 1e-12 and max(s) - min(s) <= 0.16 + 1e-12
    assert s[3] == min(s) and s[0] == max(s)


# -- quantization ------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_never_worse_than_rtn(seed, bits, group_size, act_order):
    w, stats = layer_problem(seed)
    spec = QuantSpec(bits, group_size)
    q, _ = gptq_quantize(w, stats.gram, spec, act_order=act_order)
    assert objective(w, q.dequantize(), stats.gram) < objective(w, quantize_rtn(w, spec).dequantize(), stats.gram)


def test_gptq_with_uncorrelated_inputs_is_rtn():
    w, _ = layer_problem()
    q, _ = gptq_quantize(w, torch.eye(128), QuantSpec(3, None))
    assert torch.equal(q.codes, quantize_rtn(w, QuantSpec(3, None)).codes)


@pytest.mark.parametrize("params", [dict(group_size=48), dict(group_size=48, act_order=True),
                                    dict(group_size=48, act_order=True, static_groups=True),
                                    dict(symmetric=True, act_order=True)])
def test_gptq_layouts_cost_what_they_store(params):
    w, stats = layer_problem(n=200)
    new, _ = run("gptq", [Dense(w.half())], stats, bits=4, **params)
    state = new.state("x")
    assert sum(t.numel() * t.element_size() for t in state.values()) == new.nbytes()
    again = CompressedLinear.from_state("x", new.meta(), state)
    assert torch.equal(again.to_dense(), new.to_dense())
    rtn = quantize_rtn(w, QuantSpec(4, params.get("group_size"), params.get("symmetric", False)))
    assert objective(w, new.to_dense(), stats.gram) < objective(w, rtn.dequantize(), stats.gram)


def test_gptq_on_a_sparse_term_keeps_the_mask_and_beats_rtn():
    w, stats = layer_problem()
    pruned, _ = run("sparsegpt", [Dense(w.half())], stats, pattern="2:4")
    mask = pruned.terms[0].mask
    g, _ = run("gptq", list(pruned.terms), stats, bits=3, group_size=32, target="sparse")
    r, _ = run("rtn", list(pruned.terms), stats, bits=3, group_size=32, target="sparse")
    assert torch.equal(g.terms[0].mask, mask) and (g.to_dense()[~mask] == 0).all()
    assert objective(w, g.to_dense(), stats.gram) < objective(w, r.to_dense(), stats.gram)


def test_gptq_quantizes_low_rank_factors_better_than_rtn():
    w, stats = layer_problem()
    lr, _ = run("svdllm", [Dense(w.half())], stats, rank=24)
    g, _ = run("gptq", list(lr.terms), stats, bits=3, group_size=32, target="lowrank")
    r, _ = run("rtn", list(lr.terms), stats, bits=3, group_size=32, target="lowrank")
    assert objective(w, g.to_dense(), stats.gram) < objective(w, r.to_dense(), stats.gram)


# -- low rank ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [4, 16, 40])
def test_svdllm_error_is_the_discarded_whitened_energy(rank):
    w, stats = layer_problem()
    chol, added = whitening_factor(stats.gram)
    a, b, s = svdllm_factors(w, chol, rank)
    err = objective(w, a.double() @ b.double(), stats.gram.double() + added * torch.eye(128, dtype=torch.float64))
    assert abs(err - float((s[rank:] ** 2).sum())) < 1e-5 * err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_svdllm_beats_asvd_and_svd_on_the_layer_objective(seed):
    w, stats = layer_problem(seed)
    chol, _ = whitening_factor(stats.gram)
    a, b, _ = svdllm_factors(w, chol, 20)
    a2, b2 = asvd_factors(w, stats.abs_mean, 20)
    a3, b3, _ = truncated_svd(w, 20)
    e = [objective(w, x @ y, stats.gram) for x, y in ((a, b), (a2, b2), (a3, b3))]
    assert e[0] <= e[1] and e[0] <= e[2]


def test_plain_svd_frobenius_error_is_the_discarded_energy():
    w, _ = layer_problem()
    a, b, s = truncated_svd(w, 10)
    assert abs((w - a @ b).pow(2).sum().item() - (s[10:] ** 2).sum().item()) < 1e-4 * (s[10:] ** 2).sum().item()


@pytest.mark.parametrize("technique", ["svd", "asvd", "svdllm"])
def test_low_rank_budget_is_tight_and_error_falls(technique):
    w, stats = layer_problem()
    errs = []
    for ratio in (0.3, 0.5, 0.7, 0.9):
        new, info = run(technique, [Dense(w.half())], stats, ratio=ratio)
        dense16 = 2 * w.numel()
        assert new.nbytes() <= ratio * dense16 < new.nbytes() + 2 * (48 + 128)  # the next rank would not fit
        errs.append(objective(w, new.to_dense(), stats.gram))
    assert errs == sorted(errs, reverse=True)


def test_low_rank_refuses_ranks_costlier_than_dense_and_quantized_input():
    spec = LinearSpec.dense(48, 128)
    with pytest.raises(IllegalStep, match="more than the dense"):
        get_technique("svd")(rank=40).plan(spec)
    q = LinearSpec(48, 128, (CompressedLinear(128, 48, [Dense(quantize_rtn(torch.randn(48, 128), QuantSpec(4)))])
                             .spec().terms[0],))
    with pytest.raises(IllegalStep, match="leaves the quantization grid"):
        get_technique("svdllm")(rank=8).plan(q)
    assert get_technique("svdllm")(rank=8, allow_offgrid=True).plan(q).terms[0].rank == 8


def test_singular_gram_gets_a_recorded_regularisation():
    w, stats = layer_problem()
    stats.gram[3, :] = 0
    stats.gram[:, 3] = 0
    _, info = run("svdllm", [Dense(w.half())], stats, rank=8)
    assert info["regularization_added"] > 0
    _, info = run("svdllm", [Dense(w.half())], stats, rank=8, regularization="damp", damp=0.01)
    assert info["regularization_added"] == pytest.approx(0.01 * float(stats.gram.diagonal().double().mean()))


@pytest.mark.parametrize("split", ["u", "v"])
def test_sigma_split_keeps_the_product(split):
    w, stats = layer_problem()
    ref, _ = run("svdllm", [Dense(w.half())], stats, rank=8)
    other, _ = run("svdllm", [Dense(w.half())], stats, rank=8, sigma_split=split)
    torch.testing.assert_close(other.to_dense(), ref.to_dense(), atol=2e-3, rtol=1e-2)


# -- every technique through the pipeline --------------------------------------------------------

BUDGETS = {"magnitude": ("sparsity", 0.7, 0.3), "wanda": ("sparsity", 0.7, 0.3), "sparsegpt": ("sparsity", 0.7, 0.3),
           "rtn": ("bits", 2, 4), "gptq": ("bits", 2, 4), "svd": ("ratio", 0.5, 0.9), "asvd": ("ratio", 0.5, 0.9),
           "svdllm": ("ratio", 0.5, 0.9), "qer": ("rank", 1, 8), "lqer": ("rank", 1, 8), "l2qer": ("rank", 1, 8),
           "qera": ("rank", 1, 8), "sslc": ("ratio", 0.4, 0.8), "oats": ("ratio", 0.4, 0.8),
           "dam": ("ratio", 0.2, 0.4)}


def test_every_registered_technique_has_a_pipeline_case():
    assert set(registry()) == set(BUDGETS)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("technique", sorted(BUDGETS))
def test_pipeline_bytes_as_planned_and_error_falls_with_budget(family, technique):
    knob, small, large = BUDGETS[technique]
    errors = []
    for value in (small, large):
        model = MODELS[family]()
        recipe = Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": [{technique: {knob: value}}]})
        planned = recipe.check(linear_shapes(model))
        report = compress(model, recipe, windows(4, 16))
        assert report.linear_bytes == planned.linear_bytes
        errors.append(sum(l.rel_error for l in report.layers))
    assert errors[1] < errors[0]


def test_true_sequential_gptq_runs_on_a_tiny_model():
    model = tiny_llama()
    recipe = Recipe.from_dict({"calibration": {"batch_size": 2},
                               "steps": [{"gptq": {"bits": 4, "group_size": 32, "true_sequential": True}}]})
    report = compress(model, recipe, windows())
    assert all(0 < l.rel_error < 0.1 for l in report.layers)
    assert all(isinstance(m, CompressedLinear) for n, m in model.named_modules() if n.endswith("proj"))


def test_sparse_then_quantized_mask_survives_in_the_model():
    model = tiny_llama()
    recipe = Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": [
        {"sparsegpt": {"pattern": "2:4"}}, {"gptq": {"bits": 3, "group_size": 32, "target": "sparse"}}]})
    compress(model, recipe, windows())
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            (term,) = m.terms
            assert isinstance(term, Sparse) and (m.to_dense()[~term.mask] == 0).all()
