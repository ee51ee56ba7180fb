"""GPTQ: the sweep against RTN, its exact error identity, layouts and bytes, masks, factors, pipeline."""

import pytest
import torch
from helpers import compress_as_checked, layer_problem, objective, run_technique, tiny_llama

from lmcompose.algebra import Dense, QuantSpec, quantize_rtn
from lmcompose.algebra.terms import LowRank, Sparse
from lmcompose.core.stats import Stats
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.quant.gptq import gptq_quantize
from lmcompose.techniques.registry import get_technique


def problem(seed=0, m=48, n=128, tokens=1024, device=None):
    """A weight and the Gram E[x xᵀ] of strongly correlated inputs with a few outlier channels."""
    w, stats = layer_problem(seed, m, n, tokens, mix=0.5, device=device)
    return w, stats.gram


def run(name, terms, h, **params):
    """Plan and apply a technique on one CompressedLinear; plan must cost exactly what apply stores."""
    ones = torch.ones(h.shape[0], device=h.device)
    return run_technique(name, terms, Stats(1000, h, ones, ones), **params)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_objective_at_most_rtn(seed, bits, group_size, act_order, device):
    w, h = problem(seed, device=device)
    spec = QuantSpec(bits, group_size)
    q, info = gptq_quantize(w, h, spec, act_order=act_order)
    gptq, rtn = objective(w, q.dequantize(), h), objective(w, quantize_rtn(w, spec).dequantize(), h)
    assert gptq <= rtn and gptq < 0.9 * rtn  # the compensation is worth something on correlated inputs
    assert info["bits"] == bits and info["group_size"] == group_size and info["damp"] > 0


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size,static", [(None, False), (32, False), (48, False), (48, True)])
def test_sweep_error_identity_checks_the_stored_codes(act_order, group_size, static, device):
    """ΔW = E U with U the Cholesky factor of (H+λI)⁻¹, so tr(ΔW (H+λI) ΔWᵀ) = ‖E‖² = 2·obs_loss exactly:
    fails if a code, a scale, a group or the permutation of what is stored differs from the sweep."""
    w, h = problem(3, n=200, device=device)
    w[:, 7] = 0.3
    h[7, :], h[:, 7] = 0, 0  # a dead input
    q, info = gptq_quantize(w, h, QuantSpec(3, group_size), act_order=act_order, static_groups=static,
                            blocksize=64)
    assert info["dead_columns"] == 1 and (q.dequantize()[:, 7] == 0).all()
    hd = h.double().clone()
    hd[7, 7] = 1
    hd += info["damp"] * torch.eye(200, dtype=torch.float64, device=device)
    wz = w.clone()
    wz[:, 7] = 0
    assert objective(wz, q.dequantize(), hd) == pytest.approx(2 * info["obs_loss"], rel=1e-3)
    assert (q.perm is not None) == (act_order and not static and group_size is not None)


@pytest.mark.parametrize("group_size", [None, 32])
def test_uncorrelated_inputs_give_rtn_codes(group_size):
    """With a diagonal H the Cholesky factor of H⁻¹ is diagonal: no update reaches another column, so
    the codes are RTN's, damping or not (same grid, same fp16 scale rounding)."""
    w, _ = problem()
    spec = QuantSpec(3, group_size)
    rtn = quantize_rtn(w, spec)
    for h in (torch.eye(128), torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(0)) + 0.1)):
        q, _ = gptq_quantize(w, h, spec, percdamp=0.05)
        assert torch.equal(q.codes, rtn.codes) and torch.equal(q.scale, rtn.scale)
    # act-order with groups forms groups over the permutation: RTN over the same permutation
    h = torch.diag(torch.linspace(0.1, 3, 128))
    q, _ = gptq_quantize(w, h, spec, act_order=True)
    expected = quantize_rtn(w, spec, torch.argsort(torch.diagonal(h), descending=True))
    assert torch.equal(q.codes, expected.codes) and torch.equal(q.dequantize(), expected.dequantize())


def test_exact_fp32_scales_and_symmetric_grid_also_match_rtn_on_diagonal_h():
    w, _ = problem()
    for spec in (QuantSpec(4, 64, scale_dtype="fp32"), QuantSpec(4, None, symmetric=True)):
        q, _ = gptq_quantize(w, torch.eye(128), spec)
        assert torch.equal(q.dequantize(), quantize_rtn(w, spec).dequantize())


@pytest.mark.parametrize("params", [dict(group_size=48), dict(group_size=48, act_order=True),
                                    dict(group_size=48, act_order=True, static_groups=True),
                                    dict(act_order=True, symmetric=True)])
def test_non_dividing_groups_and_layouts_cost_what_they_store(params):
    w, h = problem(n=200)
    new, info = run("gptq", [Dense(w.half())], h, bits=4, **params)
    qt = new.terms[0].a
    assert qt.scale.shape == (48, 5 if params.get("group_size") else 1)  # 4 groups of 48 + one of 8
    assert (qt.perm is not None) == get_technique("gptq")(**params).stores_perm
    again = CompressedLinear.from_state("x", new.meta(), new.state("x"))
    assert torch.equal(again.to_dense(), new.to_dense())
    assert info["act_order"] == params.get("act_order", False) and len(info["damp"]) == 1
    rtn = quantize_rtn(w, QuantSpec(4, params.get("group_size"), params.get("symmetric", False)))
    assert objective(w, new.to_dense(), h) < objective(w, rtn.dequantize(), h)


def test_act_order_round_trip_keeps_the_permutation():
    w, h = problem(1)
    new, _ = run("gptq", [Dense(w.half())], h, bits=3, group_size=32, act_order=True)
    state = new.state("x")
    perm = new.terms[0].a.perm
    assert "x.terms.0.a.perm" in state and not torch.equal(perm, torch.arange(128))
    again = CompressedLinear.from_state("x", new.meta(), state)
    assert torch.equal(again.terms[0].a.perm, perm) and torch.equal(again.to_dense(), new.to_dense())
    # the permutation matters: dropping it dequantizes to a different (wrong) matrix
    qt = new.terms[0].a
    wrong = type(qt)(qt.codes, qt.scale, qt.zero, qt.spec, None).dequantize()
    assert not torch.equal(wrong, qt.dequantize())


def test_static_groups_use_the_original_columns_grids():
    w, h = problem(2)
    spec = QuantSpec(4, 32)
    q, _ = gptq_quantize(w, h, spec, act_order=True, static_groups=True)
    assert q.perm is None and torch.equal(q.scale, quantize_rtn(w, spec).scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_term_keeps_its_mask_bit_exactly_and_beats_rtn(seed):
    w, h = problem(seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(w.shape, generator=g) > 0.5
    terms = [Sparse((w * mask).half(), mask)]
    new, _ = run("gptq", terms, h, bits=3, group_size=32, target="sparse")
    rtn, _ = run("rtn", terms, h, bits=3, group_size=32, target="sparse")
    dense = new.to_dense()
    assert torch.equal(new.terms[0].mask, mask)
    assert (dense[~mask] == 0).all() and not (dense != 0)[~mask].any()
    ref = (w * mask).half().float()
    assert objective(ref, dense, h) < 0.9 * objective(ref, rtn.to_dense(), h)
    # the kept weights compensate for the pruned ones: the sweep's error identity holds with the mask
    mask[0, 32:64] = False  # a fully pruned group: its grid sees only zeros, whatever updates reach it
    ref = ref * mask
    q, info = gptq_quantize(ref, h, QuantSpec(3, 32), mask=mask, blocksize=32)
    assert float(q.scale[0, 1]) == pytest.approx(2 / 7, rel=1e-3)
    hd = h.double() + info["damp"] * torch.eye(128, dtype=torch.float64)
    assert objective(ref, q.dequantize() * mask, hd) == pytest.approx(2 * info["obs_loss"], rel=1e-3)


def test_low_rank_factors_are_quantized_better_than_rtn():
    w, h = problem()
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    r = 24
    terms = [LowRank((u[:, :r] * s[:r].sqrt()).half(), (s[:r].sqrt().unsqueeze(1) * vt[:r]).half())]
    new, info = run("gptq", terms, h, bits=3, group_size=16, target="lowrank")
    rtn, _ = run("rtn", terms, h, bits=3, group_size=16, target="lowrank")
    lr = new.terms[0]
    assert lr.u.__class__.__name__ == "QTensor" and lr.v.__class__.__name__ == "QTensor"
    base = terms[0].weight()
    ours, theirs = objective(base, new.to_dense(), h), objective(base, rtn.to_dense(), h)
    assert torch.isfinite(new.to_dense()).all() and ours < theirs
    assert len(info["damp"]) == 2


def test_cholesky_failure_names_the_shape_and_percdamp():
    w, _ = problem()
    h = -torch.eye(128)
    h[0, 0] = 5.0
    with pytest.raises(ValueError, match=r"Hessian of the 48x128 layer.*raise percdamp"):
        gptq_quantize(w, h, QuantSpec(4, None), percdamp=0.0)


def test_bad_arguments_are_value_errors():
    w, h = problem()
    with pytest.raises(ValueError, match="blocksize"):
        gptq_quantize(w, h, QuantSpec(4, None), blocksize=0)
    with pytest.raises(ValueError, match="h has shape"):
        gptq_quantize(w, h[:10, :10], QuantSpec(4, None))
    with pytest.raises(ValueError):
        get_technique("gptq")(bits=4, percdamp=-1)


@pytest.mark.parametrize("params", [dict(bits=4, group_size=32, true_sequential=True),
                                    dict(bits=3, group_size=48, act_order=True, true_sequential=True)])
def test_pipeline_on_tiny_llama_costs_what_it_stores(params):
    model = tiny_llama()
    report, planned = compress_as_checked(model, [{"gptq": params}])
    linears = [m for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    assert len(linears) == 14
    real = sum(t.numel() * t.element_size() for m in linears for t in m.state("x").values())
    assert report.linear_bytes == planned.linear_bytes == real
    assert all(0 < l.rel_error < 0.2 for l in report.layers)
    assert all(l.steps[-1]["act_order"] == params.get("act_order", False) for l in report.layers)
