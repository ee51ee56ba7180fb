"""SparseGPT: properties that fail when the math is wrong, on synthetic layers and a tiny Llama."""

import pytest
import torch
from pydantic import ValidationError

from helpers import tiny_llama, windows
from lmcompose import Recipe, compress
from lmcompose.algebra import CompressedLinear, Dense, QuantSpec, Sparse, quantize_rtn
from lmcompose.algebra.spec import SparseSpec
from lmcompose.pipeline.blocks import linear_shapes
from lmcompose.pipeline.stats import StatsAccumulator
from lmcompose.registry import IllegalStep, get_technique
from lmcompose.techniques.prune.sparsegpt import (SparseGPT, block_keep_counts, damped_inverse_cholesky,
                                                  sparsegpt_prune)

M, N = 40, 96


def layer_problem(seed=0, m=M, n=N, tokens=768, dead=()):
    """A weight and the statistics of strongly correlated inputs with a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + 0.6 * torch.randn(n, n, generator=g) / n ** 0.5)
    x[:, :3] *= 8
    x[:, list(dead)] = 0
    acc = StatsAccumulator(n)
    acc.update(x)
    return torch.randn(m, n, generator=g).half().float(), acc.result()


def objective(w, w_hat, gram):
    dw = (w - w_hat).double()
    return float(((dw @ gram.double()) * dw).sum())


def run(technique, w, stats, **params):
    cfg = get_technique(technique)(**params)
    layer = CompressedLinear(w.shape[1], w.shape[0], [Dense(w.half())])
    planned = cfg.plan(layer.spec())
    new, info = cfg.apply(layer, stats)
    assert new.spec() == planned and new.nbytes() == planned.nbytes()
    state = new.state("x")
    assert sum(t.numel() * t.element_size() for t in state.values()) == new.nbytes()
    return new, info


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_has_exactly_n_per_group_and_updates_the_kept_weights(pattern):
    n, m = map(int, pattern.split(":"))
    w, stats = layer_problem()
    new, info = run("sparsegpt", w, stats, pattern=pattern, blocksize=32)
    mask = new.terms[0].mask
    assert (mask.reshape(M, -1, m).sum(-1) == n).all()
    assert ((new.to_dense() != 0).reshape(M, -1, m).sum(-1) == n).all()
    assert not torch.equal(new.to_dense()[mask], w[mask])  # OBS moved the survivors
    assert info["sparsity"] == pytest.approx(1 - n / m)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [{"sparsity": 0.3}, {"sparsity": 0.5}, {"sparsity": 0.7}, {"pattern": "2:4"}])
def test_layer_objective_beats_magnitude_and_wanda(seed, budget):
    w, stats = layer_problem(seed)
    err = {}
    for name, extra in [("sparsegpt", {}), ("wanda", {}), ("magnitude", {"scope": "row"}),
                        ("magnitude", {"scope": "matrix"})]:
        new, _ = run(name, w, stats, **budget, **({} if "pattern" in budget else extra))
        err[name + extra.get("scope", "")] = objective(w, new.to_dense(), stats.gram)
    assert err["sparsegpt"] < min(err["wanda"], err["magnituderow"], err["magnitudematrix"])


def test_sparsity_zero_returns_w_and_error_falls_with_sparsity():
    w, stats = layer_problem()
    new, _ = run("sparsegpt", w, stats, sparsity=0.0)
    assert torch.equal(new.to_dense(), w.half().float()) and bool(new.terms[0].mask.all())
    errs = [objective(w, run("sparsegpt", w, stats, sparsity=s)[0].to_dense(), stats.gram)
            for s in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert errs == sorted(errs) and errs[0] > 0


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.63])
def test_each_block_prunes_exactly_int_numel_times_s(sparsity):
    w, stats = layer_problem()
    new, _ = run("sparsegpt", w, stats, sparsity=sparsity, blocksize=40)
    mask = new.terms[0].mask
    for i1, width in [(0, 40), (40, 40), (80, 16)]:
        assert int((~mask[:, i1:i1 + width]).sum()) == int(M * width * sparsity)


def test_lazy_block_updates_equal_the_unblocked_sweep():
    w, stats = layer_problem()
    a, mask_a, _ = sparsegpt_prune(w, stats.gram, nm=(2, 4), blocksize=8)
    b, mask_b, _ = sparsegpt_prune(w, stats.gram, nm=(2, 4), blocksize=N)
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_single_column_obs_update_is_optimal_for_the_remaining_columns():
    """Pruning one entry and compensating must minimise the objective over the later columns: the
    gradient of tr(ΔW H ΔWᵀ) w.r.t. the updated entries of that row vanishes."""
    w, stats = layer_problem(n=16, m=1)
    keep = block_keep_counts(1, 16, 16, keep_total=15)
    out, mask, _ = sparsegpt_prune(w, stats.gram.double(), keep, percdamp=1e-9, dtype=torch.float64)
    (j,) = (~mask[0]).nonzero()[0].tolist()
    grad = ((out - w).double() @ stats.gram.double())[0, j + 1:]
    assert grad.abs().max() < 1e-6 * (w.double() @ stats.gram.double()).abs().max()


def test_dead_input_channels_give_zero_columns_and_no_nan():
    w, stats = layer_problem(dead=(5, 50))
    for params in ({"sparsity": 0.5}, {"pattern": "2:4"}):
        new, info = run("sparsegpt", w, stats, **params)
        out = new.to_dense()
        assert info["dead_columns"] == 2 and torch.isfinite(out).all()
        assert (out[:, [5, 50]] == 0).all()


def test_fp64_precision_agrees_with_fp32():
    w, stats = layer_problem()
    a, _ = run("sparsegpt", w, stats, sparsity=0.5)
    b, info = run("sparsegpt", w, stats, sparsity=0.5, precision="fp64")
    agree = (a.terms[0].mask == b.terms[0].mask).float().mean()
    assert agree > 0.99 and info["precision"] == "fp64"
    assert objective(w, b.to_dense(), stats.gram) == pytest.approx(objective(w, a.to_dense(), stats.gram), rel=1e-2)


def test_indefinite_hessian_raises_naming_the_layer_and_percdamp():
    w, stats = layer_problem()
    h = torch.eye(N)
    h[3, 3] = -50.0
    with pytest.raises(ValueError, match=r"40x96 layer.*percdamp"):
        sparsegpt_prune(w, h, block_keep_counts(M, N, 128, 0.5))
    with pytest.raises(ValueError, match="non-finite"):
        damped_inverse_cholesky(torch.full((4, 4), float("nan")), 0.01)


@pytest.mark.parametrize("ratio", [0.2, 0.45, 0.7, 0.95])
def test_ratio_costs_the_exact_nnz_and_is_the_largest_that_fits(ratio):
    w, stats = layer_problem()
    new, _ = run("sparsegpt", w, stats, ratio=ratio)
    spec = CompressedLinear(N, M, [Dense(w.half())]).spec()
    budget = ratio * spec.dense_fp16_nbytes()
    nnz = int(new.terms[0].mask.sum())
    assert new.nbytes() <= budget < spec.with_terms([SparseSpec(spec.terms[0].a, nnz + 1)]).nbytes()
    assert nnz == SparseGPT(ratio=ratio).keep_count(spec)


def test_quantized_input_is_refused_at_plan():
    w, stats = layer_problem()
    layer = CompressedLinear(N, M, [Dense(quantize_rtn(w, QuantSpec(4, 32)))])
    with pytest.raises(IllegalStep, match="leave the quantization grid"):
        SparseGPT(sparsity=0.5).plan(layer.spec())


def test_config_validation():
    with pytest.raises(ValidationError, match="blocksize=30"):
        SparseGPT(pattern="4:8", blocksize=30)
    with pytest.raises(ValidationError):
        SparseGPT(sparsity=0.5, precision="fp16")


def test_pipeline_bytes_match_the_check_on_a_tiny_llama():
    for step in ({"sparsegpt": {"ratio": 0.6}}, {"sparsegpt": {"sparsity": 0.5, "blocksize": 48}},
                 {"sparsegpt": {"pattern": "2:4"}}):
        model = tiny_llama(layers=1)
        recipe = Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": [step]})
        planned = recipe.check(linear_shapes(model))
        report = compress(model, recipe, windows(4, 16))
        assert report.linear_bytes == planned.linear_bytes
        for name, mod in model.named_modules():
            if isinstance(mod, CompressedLinear):
                assert isinstance(mod.terms[0], Sparse) and mod.nbytes() == planned.specs[name].nbytes()
        assert all(0 < l.rel_error < 1 for l in report.layers)
