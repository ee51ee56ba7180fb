"""DAM (joint low rank + quantization with a learned diagonal) and its two plain orders, L→Q and Q→L."""

import pytest
import torch
from helpers import compress_as_checked, layer_problem, objective, tiny_llama, windows
from helpers import run_technique as run

from lmcompose import Recipe
from lmcompose.algebra import Dense, QuantSpec, quantize_rtn
from lmcompose.algebra.spec import LinearSpec
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.joint import dam  # noqa: F401  (registers `dam`)
from lmcompose.techniques.joint.dam import (
    fake_quantize,
    smoothquant_diagonal,
    surrogate_tokens,
)
from lmcompose.techniques.lowrank.svd import truncated_svd
from lmcompose.techniques.quant.gptq import gptq_quantize
from lmcompose.techniques.registry import get_technique

M, N = 48, 128


def dam_run(w, stats, **params):
    """Plan + apply on a fp16 Dense layer (run() checks the stored bytes); also checks the file round trip."""
    new, info = run("dam", [Dense(w.half())], stats, **params)
    again = CompressedLinear.from_state("x", new.meta(), new.state("x"))
    torch.testing.assert_close(again.to_dense(), new.to_dense())
    return new, info


def err(w, new, stats):
    return objective(w.half().float(), new.to_dense(), stats.gram)


# -- the pieces ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [QuantSpec(3, None, True), QuantSpec(4, 32, False), QuantSpec(2, 64, True)])
def test_fake_quantize_is_rtn_forward_and_straight_through_plus_step_backward(spec):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = fake_quantize(w, spec)
    assert torch.equal(out.detach(), quantize_rtn(w.detach(), spec).dequantize())
    g = torch.randn_like(w)
    (out * g).sum().backward()
    # pure straight-through would give exactly g; the step's gradient lands only on each group's extremes
    extra = (w.grad - g) != 0
    gs = spec.group_size or 128
    groups = w.detach().reshape(16, -1, gs)
    extremes = ((w.detach() == groups.amax(-1).repeat_interleave(gs, 1))
                | (w.detach() == groups.amin(-1).repeat_interleave(gs, 1)))
    assert extra.any() and not (extra & ~extremes).any()


def test_smoothquant_init_balances_weight_columns_and_rank_activations():
    w, stats = layer_problem()
    a, b, _ = truncated_svd(w, 20)
    d = smoothquant_diagonal(a, b, stats.gram, alpha=0.5)
    rms = ((b @ stats.gram) * b).sum(1).sqrt()
    # after migration, max|U_:,i| = max|A_:,i|·d_i equals rms(z_i)/d_i for every rank channel
    torch.testing.assert_close(a.abs().amax(0) * d, rms / d, rtol=1e-4, atol=0)
    b[3] = 0  # a dead rank channel keeps d = 1
    assert smoothquant_diagonal(a, b, stats.gram)[3] == 1


def test_surrogate_tokens_have_the_calibration_second_moments():
    _, stats = layer_problem()
    x = surrogate_tokens(stats.gram, 40000, torch.Generator().manual_seed(0))
    gram = x.T @ x / x.shape[0]
    assert (gram - stats.gram).norm() < 0.03 * stats.gram.norm()


# -- plan == apply, storage ----------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    dict(rank=16), dict(rank=16, fold_d=False), dict(rank=16, quantizer="rtn", group_size=8, symmetric=False),
    dict(rank=16, act_order=True, group_size=8), dict(ratio=0.3, decomposition="svdllm"),
    dict(ratio=0.3, fold_d=False, bits=3, group_size=32), dict(rank=16, mode="l_then_q", group_size=8),
    dict(ratio=0.3, mode="q_then_l"), dict(rank=16, act_bits=8, act_tokens=512, steps=20)])
def test_plan_is_what_apply_stores(params, device):
    w, stats = layer_problem(device=device)
    if params.get("mode", "dam") == "dam":
        params = {"steps": 30, **params}  # a short fit: this test is about storage
    new, info = dam_run(w, stats, **params)
    (term,) = new.terms
    assert info["rank"] == term.spec().rank and info["ratio"] == pytest.approx(new.nbytes() / (2 * M * N))
    assert (term.d is not None) == (params.get("fold_d") is False)


def test_ratio_is_the_largest_rank_whose_quantized_factors_fit():
    spec = LinearSpec.dense(M, N)
    for params in (dict(bits=4), dict(bits=3, group_size=32, symmetric=False), dict(bits=4, fold_d=False)):
        cfg = get_technique("dam")(ratio=0.25, **params)
        planned = cfg.plan(spec)
        r = planned.terms[0].rank
        assert planned.nbytes() <= 0.25 * 2 * M * N < cfg.spec_for(spec, r + 1).nbytes()


# -- the method ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits,group_size", [(2, None), (3, None), (3, 16)])
def test_learned_d_never_ends_above_its_initialisation(seed, bits, group_size):
    w, stats = layer_problem(seed)
    _, info = dam_run(w, stats, rank=40, bits=bits, group_size=group_size, decomposition="svdllm")
    assert info["fit_loss_final"] <= min(info["fit_loss_initial"], info["fit_loss_identity"])
    assert info["fit_loss_final"] < 0.97 * info["fit_loss_initial"]  # the descent does something


@pytest.mark.parametrize("decomposition", ["svd", "svdllm"])
def test_rtn_fit_loss_is_the_stored_layer_error(decomposition):
    """With quantizer rtn the fit's forward is exactly what is stored: the recorded losses are real."""
    w, stats = layer_problem()
    ref = objective(w.half().float(), torch.zeros_like(w), stats.gram)
    kw = dict(rank=40, bits=3, quantizer="rtn", decomposition=decomposition)
    new, info = dam_run(w, stats, **kw)
    assert err(w, new, stats) / ref == pytest.approx(info["fit_loss_final"], rel=1e-4)
    plain, _ = dam_run(w, stats, mode="l_then_q", **kw)
    assert err(w, plain, stats) / ref == pytest.approx(info["fit_loss_identity"], rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decomposition,quantizer", [("svdllm", "gptq"), ("svdllm", "rtn"), ("svd", "rtn")])
def test_dam_beats_plain_l_then_q_on_an_outlier_layer(seed, decomposition, quantizer):
    w, stats = layer_problem(seed)  # 4 input channels 8x larger, correlated inputs
    kw = dict(rank=40, bits=3, decomposition=decomposition, quantizer=quantizer)
    learned, _ = dam_run(w, stats, **kw)
    plain, _ = dam_run(w, stats, mode="l_then_q", **kw)
    assert learned.nbytes() == plain.nbytes()
    assert err(w, learned, stats) <= err(w, plain, stats)


def test_error_falls_as_rank_grows():
    w, stats = layer_problem()
    errs = [err(w, dam_run(w, stats, rank=r, bits=4, decomposition="svdllm", steps=60)[0], stats)
            for r in (4, 12, 24, 36, 48)]
    assert errs == sorted(errs, reverse=True)


def test_stored_d_costs_r_values_and_leaves_the_codes_of_v():
    w, stats = layer_problem()
    folded, info = dam_run(w, stats, rank=24, bits=3, quantizer="rtn", steps=60)
    kept, info2 = dam_run(w, stats, rank=24, bits=3, quantizer="rtn", steps=60, fold_d=False)
    assert info["fit_loss_final"] == info2["fit_loss_final"]  # one fit, two storage layouts
    assert kept.nbytes() - folded.nbytes() == 2 * 24 and kept.terms[0].d.dtype == torch.float16
    # V's grids run along its rows: 1/d on a row scales its scales, not its codes (up to fp16 scale rounding)
    same = (kept.terms[0].v.codes == folded.terms[0].v.codes).float().mean()
    assert same > 0.99
    assert err(w, kept, stats) == pytest.approx(err(w, folded, stats), rel=0.02)


def test_q_then_l_is_flagged_analysis_only_and_factorizes_the_quantized_matrix():
    w, stats = layer_problem()
    new, info = dam_run(w, stats, rank=48, bits=3, group_size=32, mode="q_then_l")
    assert info["analysis_only"] is True and "analysis_only" not in dam_run(w, stats, rank=8, steps=5)[1]
    (term,) = new.terms
    assert term.u.dtype == torch.float16 and new.nbytes() == 2 * 48 * (M + N)
    # at full rank the factors rebuild GPTQ's quantized matrix (same grid, same Gram)
    q, _ = gptq_quantize(w.half().float(), stats.gram, QuantSpec(3, 32, True))
    torch.testing.assert_close(new.to_dense(), q.dequantize(), rtol=0, atol=3e-3 * q.dequantize().abs().max())
    # with a ratio it takes the deployable modes' rank (the budget does not bind: analysis only)
    _, lq = dam_run(w, stats, ratio=0.3, mode="l_then_q")
    _, ql = dam_run(w, stats, ratio=0.3, mode="q_then_l")
    assert lq["rank"] == ql["rank"]


def test_activation_quantization_is_a_fit_time_option():
    w, stats = layer_problem()
    new, info = dam_run(w, stats, rank=32, bits=4, act_bits=8, act_tokens=1024, steps=60)
    plain, _ = dam_run(w, stats, rank=32, bits=4, steps=60)
    assert info["act_bits"] == 8 and new.spec() == plain.spec()  # nothing about activations is stored
    assert info["fit_loss_final"] <= min(info["fit_loss_initial"], info["fit_loss_identity"])


@pytest.mark.parametrize("params,field", [
    (dict(rank=8, mode="l_then_q", steps=10), "steps"), (dict(rank=8, mode="q_then_l", fold_d=False), "fold_d"),
    (dict(rank=8, seed=3), "seed"), (dict(rank=8, quantizer="rtn", act_order=True), "act_order"),
    (dict(rank=8, ratio=0.3), "exactly one of rank, ratio"), (dict(rank=8, bits=9), "bits"),
    (dict(rank=8, mode="qlq"), "mode"), (dict(rank=8, act_bits=4), "act_bits")])
def test_bad_configs_name_the_field(params, field):
    with pytest.raises(ValueError, match=field):
        get_technique("dam")(**params)


def test_recipes_round_trip_whatever_the_mode():
    recipe = Recipe.from_dict({"steps": [{"dam": {"rank": 8, "mode": "l_then_q", "quantizer": "rtn"}},
                                         {"dam": {"ratio": 0.3, "act_bits": 8, "seed": 2, "fold_d": False}}]})
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.hash() == recipe.hash()


# -- through the pipeline ------------------------------------------------------------------------

def test_tiny_llama_recipe_bytes_as_checked():
    model = tiny_llama()
    report, planned = compress_as_checked(
        model, [{"dam": {"ratio": 0.3, "bits": 4, "group_size": 32, "steps": 10, "fold_d": False}}], windows(4, 16))
    assert report.linear_bytes == planned.linear_bytes <= 0.3 * planned.linear_dense_bytes
    assert all(0 < l.rel_error < 1 and l.steps[-1]["fit_loss_final"] <= l.steps[-1]["fit_loss_initial"]
               for l in report.layers)
    assert torch.isfinite(model(input_ids=windows(1, 8), use_cache=False).logits).all()
