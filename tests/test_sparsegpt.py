"""SparseGPT: properties that fail when the math is wrong, on synthetic layers and a tiny Llama."""

import pytest
import torch
from helpers import compress_as_checked, layer_problem, objective, run_technique, tiny_llama, windows
from pydantic import ValidationError

from lmcompose.algebra import Dense, QuantSpec, Sparse, quantize_rtn
from lmcompose.algebra.spec import SparseSpec
from lmcompose.core.errors import IllegalStep
from lmcompose.core.linalg import damped_inverse_cholesky
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.prune.sparsegpt import (
    SparseGPT,
    block_keep_counts,
    sparsegpt_prune,
)
from lmcompose.techniques.registry import get_technique

M, N = 40, 96


def problem(seed=0, m=M, n=N, tokens=768, dead=(), device=None):
    """A weight (fp16 values) and the statistics of strongly correlated inputs with a few outlier channels."""
    w, stats = layer_problem(seed, m, n, tokens, mix=0.6, outliers=3, dead=dead, inputs_first=True, device=device)
    return w.half().float(), stats


def run(technique, w, stats, **params):
    """Plan and apply `technique` on a fp16 Dense layer of `w` (plan == apply, stored bytes == planned)."""
    return run_technique(technique, [Dense(w.half())], stats, **params)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_has_exactly_n_per_group_and_updates_the_kept_weights(pattern, device):
    n, m = map(int, pattern.split(":"))
    w, stats = problem(device=device)
    new, info = run("sparsegpt", w, stats, pattern=pattern, blocksize=32)
    mask = new.terms[0].mask
    assert (mask.reshape(M, -1, m).sum(-1) == n).all()
    assert ((new.to_dense() != 0).reshape(M, -1, m).sum(-1) == n).all()
    assert not torch.equal(new.to_dense()[mask], w[mask])  # OBS moved the survivors
    assert info["sparsity"] == pytest.approx(1 - n / m)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [{"sparsity": 0.3}, {"sparsity": 0.5}, {"sparsity": 0.7}, {"pattern": "2:4"}])
def test_layer_objective_beats_magnitude_and_wanda(seed, budget):
    w, stats = problem(seed)
    err = {}
    for name, extra in [("sparsegpt", {}), ("wanda", {}), ("magnitude", {"scope": "row"}),
                        ("magnitude", {"scope": "matrix"})]:
        new, _ = run(name, w, stats, **budget, **({} if "pattern" in budget else extra))
        err[name + extra.get("scope", "")] = objective(w, new.to_dense(), stats.gram)
    assert err["sparsegpt"] < err["wanda"] < min(err["magnituderow"], err["magnitudematrix"])


def test_sparsity_zero_returns_w_and_error_falls_with_sparsity():
    w, stats = problem()
    new, _ = run("sparsegpt", w, stats, sparsity=0.0)
    assert torch.equal(new.to_dense(), w.half().float()) and bool(new.terms[0].mask.all())
    errs = [objective(w, run("sparsegpt", w, stats, sparsity=s)[0].to_dense(), stats.gram)
            for s in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert errs == sorted(errs) and errs[0] > 0


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.63])
def test_each_block_prunes_exactly_int_numel_times_s(sparsity, device):
    w, stats = problem(device=device)
    new, _ = run("sparsegpt", w, stats, sparsity=sparsity, blocksize=40)
    mask = new.terms[0].mask
    for i1, width in [(0, 40), (40, 40), (80, 16)]:
        assert int((~mask[:, i1:i1 + width]).sum()) == int(M * width * sparsity)


def test_lazy_block_updates_equal_the_unblocked_sweep():
    w, stats = problem()
    a, mask_a, _ = sparsegpt_prune(w, stats.gram, nm=(2, 4), blocksize=8)
    b, mask_b, _ = sparsegpt_prune(w, stats.gram, nm=(2, 4), blocksize=N)
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_single_column_obs_update_is_optimal_for_the_remaining_columns():
    """Pruning one entry and compensating must minimise the objective over the later columns: the
    gradient of tr(ΔW H ΔWᵀ) w.r.t. the updated entries of that row vanishes."""
    w, stats = problem(n=16, m=1)
    keep = block_keep_counts(1, 16, 16, keep_total=15)
    out, mask, _ = sparsegpt_prune(w, stats.gram.double(), keep, percdamp=1e-9, dtype=torch.float64)
    (j,) = (~mask[0]).nonzero()[0].tolist()
    grad = ((out - w).double() @ stats.gram.double())[0, j + 1:]
    assert grad.abs().max() < 1e-6 * (w.double() @ stats.gram.double()).abs().max()


def test_dead_input_channels_give_zero_columns_and_no_nan(device):
    w, stats = problem(dead=(5, 50), device=device)
    for params in ({"sparsity": 0.5}, {"pattern": "2:4"}):
        new, info = run("sparsegpt", w, stats, **params)
        out = new.to_dense()
        assert info["dead_columns"] == 2 and torch.isfinite(out).all()
        assert (out[:, [5, 50]] == 0).all()


def test_fp64_precision_agrees_with_fp32():
    w, stats = problem()
    a, _ = run("sparsegpt", w, stats, sparsity=0.5)
    b, info = run("sparsegpt", w, stats, sparsity=0.5, precision="fp64")
    agree = (a.terms[0].mask == b.terms[0].mask).float().mean()
    assert agree > 0.99 and info["precision"] == "fp64"
    assert objective(w, b.to_dense(), stats.gram) == pytest.approx(objective(w, a.to_dense(), stats.gram), rel=1e-2)


def test_indefinite_hessian_raises_naming_the_layer_and_percdamp():
    w, stats = problem()
    h = torch.eye(N)
    h[3, 3] = -50.0
    with pytest.raises(ValueError, match=r"40x96 layer.*percdamp"):
        sparsegpt_prune(w, h, block_keep_counts(M, N, 128, 0.5))
    with pytest.raises(ValueError, match="non-finite"):
        damped_inverse_cholesky(torch.full((4, 4), float("nan")), 0.01)


@pytest.mark.parametrize("ratio", [0.2, 0.45, 0.7, 0.95])
def test_ratio_costs_the_exact_nnz_and_is_the_largest_that_fits(ratio):
    w, stats = problem()
    new, _ = run("sparsegpt", w, stats, ratio=ratio)
    spec = CompressedLinear(N, M, [Dense(w.half())]).spec()
    budget = ratio * spec.dense_fp16_nbytes()
    nnz = int(new.terms[0].mask.sum())
    assert new.nbytes() <= budget < spec.with_terms([SparseSpec(spec.terms[0].a, nnz + 1)]).nbytes()
    assert nnz == SparseGPT(ratio=ratio).keep_count(spec)


def test_quantized_input_is_refused_at_plan():
    w, stats = problem()
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
        report, _ = compress_as_checked(model, [step], windows(4, 16))  # every Linear costs what was planned
        for mod in model.modules():
            if isinstance(mod, CompressedLinear):
                assert isinstance(mod.terms[0], Sparse)
        assert all(0 < l.rel_error < 1 for l in report.layers)


# -- joint prune + quantize (`bits`) ---------------------------------------------------------------

def then(technique, layer, stats, **params):
    """Apply a second step to `layer`; its plan must cost exactly what it stores."""
    cfg = get_technique(technique)(**params)
    planned = cfg.plan(layer.spec())
    new, _ = cfg.apply(layer, stats)
    assert new.spec() == planned
    return new


@pytest.mark.parametrize("budget", [{"sparsity": 0.5}, {"pattern": "2:4"}])
@pytest.mark.parametrize("group_size", [None, 32])
def test_joint_objective_against_sparsegpt_then_gptq_and_rtn(budget, group_size):
    """One sweep that prunes and rounds against SparseGPT followed by GPTQ / RTN on the same mask.
    Never worse than RTN after SparseGPT; with group grids also no worse than GPTQ after SparseGPT in
    total over seeds. Per-row grids (fitted up front to the unpruned W, as the reference) lose to the
    sequential GPTQ by up to ~2% on some seeds: the sweep's compensation outgrows the early grid."""
    q = {"bits": 4, "group_size": group_size}
    err = {"joint": [], "block_start": [], "gptq": [], "rtn": []}
    for seed in (0, 1, 2):
        w, stats = problem(seed)
        joint, _ = run("sparsegpt", w, stats, **budget, **q)
        stale, _ = run("sparsegpt", w, stats, **budget, **q, grid_from="block_start")
        sparse, _ = run("sparsegpt", w, stats, **budget)
        seq = then("gptq", sparse, stats, target="sparse", **q)
        rtn = then("rtn", sparse, stats, target="sparse", **q)
        assert torch.equal(seq.terms[0].mask, sparse.terms[0].mask)
        for name, new in [("joint", joint), ("block_start", stale), ("gptq", seq), ("rtn", rtn)]:
            err[name].append(objective(w, new.to_dense(), stats.gram))
        assert err["joint"][-1] <= err["rtn"][-1]
        assert err["joint"][-1] > objective(w, sparse.to_dense(), stats.gram)  # rounding costs something
    if group_size:
        assert sum(err["joint"]) <= sum(err["gptq"])
        assert sum(err["joint"]) <= sum(err["block_start"])  # fresh grids fit the compensated weights


@pytest.mark.parametrize("params", [dict(sparsity=0.5, blocksize=40, group_size=32),
                                    dict(sparsity=0.63, blocksize=40, bits=3, symmetric=True),
                                    dict(pattern="2:4", blocksize=32, group_size=16, scale_dtype="bf16"),
                                    dict(pattern="4:8", blocksize=32, group_size=48)])
def test_joint_mask_counts_are_exact_and_values_are_on_the_stored_grid(params):
    w, stats = problem()
    params = {"bits": 4, **params}
    new, info = run("sparsegpt", w, stats, **params)
    term = new.terms[0]
    mask, qt = term.mask, term.values
    assert qt.spec == QuantSpec(params["bits"], params.get("group_size"), params.get("symmetric", False),
                                params.get("scale_dtype", "fp16"))
    if "pattern" in params:
        n, m = map(int, params["pattern"].split(":"))
        assert (mask.reshape(M, -1, m).sum(-1) == n).all() and (term.n, term.m) == (n, m)
    else:
        for i1 in range(0, N, 40):
            width = min(40, N - i1)
            assert int((~mask[:, i1:i1 + width]).sum()) == int(M * width * params["sparsity"])
    dense = new.to_dense()
    assert (dense[~mask] == 0).all() and torch.equal(dense, qt.dequantize() * mask)
    # the kept values are grid points: rounding them again to their group's grid gives the same codes
    gidx = qt.group_index()
    zero = (qt.zero.float() if qt.zero is not None else torch.full_like(qt.scale.float(), 2 ** (qt.spec.bits - 1)))
    again = torch.clamp(torch.round(dense / qt.scale.float()[:, gidx]) + zero[:, gidx], 0, qt.spec.maxq)
    assert torch.equal(again[mask], qt.codes[mask].float())
    # the stored file holds the same weights, bit for bit
    loaded = Sparse.from_state("x", term.meta(), term.state("x"))
    assert torch.equal(loaded.mask, mask) and torch.equal(loaded.weight(), term.weight())
    assert info["bits"] == params["bits"] and not torch.equal(dense[mask], w[mask])


@pytest.mark.parametrize("kw", [dict(), dict(group_size=32), dict(group_size=48), dict(group_size=32, nm=(2, 4)),
                                dict(group_size=32, grid_from="block_start"), dict(group_size=32, fp64=True)])
def test_joint_sweep_error_identity_checks_the_stored_codes_and_mask(kw):
    """ΔW = E U, U the Cholesky factor of (H+λI)⁻¹, so tr(ΔW (H+λI) ΔWᵀ) = ‖E‖² = 2·obs_loss: fails if a
    code, a scale, a group or the mask stored differs from what the sweep used to spread the error."""
    w, stats = problem(dead=(7,))
    nm, fp64 = kw.pop("nm", None), kw.pop("fp64", False)
    grid_from = kw.pop("grid_from", "swept")
    keep = None if nm else block_keep_counts(M, N, 40, 0.5)
    qt, mask, info = sparsegpt_prune(w, stats.gram, keep, nm, 40, quant=QuantSpec(3, **kw), grid_from=grid_from,
                                     dtype=torch.float64 if fp64 else torch.float32)
    w_hat = qt.dequantize() * mask
    assert info["dead_columns"] == 1 and (w_hat[:, 7] == 0).all()
    hd = stats.gram.double().clone()
    hd[7, 7] = 1
    hd += info["damp"] * torch.eye(N, dtype=torch.float64)
    wz = w.clone()
    wz[:, 7] = 0
    assert objective(wz, w_hat, hd) == pytest.approx(2 * info["obs_loss"], rel=1e-3 if not fp64 else 1e-8)


@pytest.mark.parametrize("group_size", [None, 32])
def test_joint_with_uncorrelated_inputs_rounds_the_kept_weights_like_rtn(group_size):
    """With a diagonal H no update reaches another column: the mask is the per-block top-k of
    w²·(H_jj + λ), and the codes are RTN's on the grid of the unpruned W (per row) or of the kept
    weights of each group."""
    w, _ = problem()
    diag = torch.rand(N, generator=torch.Generator().manual_seed(3)) + 0.5
    spec = QuantSpec(4, group_size)
    qt, mask, info = sparsegpt_prune(w, torch.diag(diag), block_keep_counts(M, N, 32, 0.5), blocksize=32, quant=spec)
    score = w ** 2 * (diag + info["damp"])
    for i1 in range(0, N, 32):
        block = mask[:, i1:i1 + 32]
        kept = score[:, i1:i1 + 32][block]
        assert int(block.sum()) == M * 16 and kept.min() >= score[:, i1:i1 + 32][~block].max()
    rtn = quantize_rtn(w if group_size is None else w * mask, spec)
    assert torch.equal(qt.codes[mask], rtn.codes[mask]) and torch.equal(qt.scale, rtn.scale)


@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.45])
def test_joint_ratio_keeps_the_most_weights_whose_codes_fit(ratio):
    w, stats = problem()
    new, _ = run("sparsegpt", w, stats, ratio=ratio, bits=4, group_size=32)
    plain, _ = run("sparsegpt", w, stats, ratio=ratio)
    spec = CompressedLinear(N, M, [Dense(w.half())]).spec()
    budget = ratio * spec.dense_fp16_nbytes()
    term = new.terms[0]
    nnz = int(term.mask.sum())
    values = new.spec().terms[0].values
    assert values.quant == QuantSpec(4, 32) and term.values.codes.shape == (M, N)
    assert new.nbytes() <= budget
    assert nnz == M * N or budget < spec.with_terms([SparseSpec(values, nnz + 1)]).nbytes()  # 0.45: all fit
    assert nnz == SparseGPT(ratio=ratio, bits=4, group_size=32).keep_count(spec)
    assert nnz > 1.5 * int(plain.terms[0].mask.sum())  # 4-bit codes (+ scales) buy more kept weights than fp16


def test_joint_config_validation():
    with pytest.raises(ValidationError, match="group_size=32 needs bits"):
        SparseGPT(sparsity=0.5, group_size=32)
    with pytest.raises(ValidationError, match="grid_from='block_start' needs bits"):
        SparseGPT(sparsity=0.5, grid_from="block_start")
    for cfg in (SparseGPT(sparsity=0.5), SparseGPT(sparsity=0.5, bits=3, group_size=64, symmetric=True)):
        assert SparseGPT(**cfg.params()) == cfg  # the dumped defaults of the quantization fields are accepted
    for bad in (dict(bits=1), dict(bits=9), dict(bits=4, grid_from="w"), dict(bits=4, scale_dtype="fp8")):
        with pytest.raises(ValidationError):
            SparseGPT(sparsity=0.5, **bad)
    w, stats = problem()
    with pytest.raises(ValueError, match="grid_from='later'"):
        sparsegpt_prune(w, stats.gram, block_keep_counts(M, N, 128, 0.5), quant=QuantSpec(4), grid_from="later")
    layer = CompressedLinear(N, M, [Dense(quantize_rtn(w, QuantSpec(4, 32)))])
    with pytest.raises(IllegalStep, match="leave the quantization grid"):
        SparseGPT(sparsity=0.5, bits=4).plan(layer.spec())


@pytest.mark.parametrize("params", [{"sparsity": 0.5, "bits": 4, "group_size": 32},
                                    {"ratio": 0.2, "bits": 3, "blocksize": 32, "group_size": 48},
                                    {"pattern": "2:4", "bits": 4, "symmetric": True}])
def test_joint_pipeline_bytes_match_the_check_on_a_tiny_llama(params):
    model = tiny_llama(layers=1)
    report, planned = compress_as_checked(model, [{"sparsegpt": params}], windows(4, 16))
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, CompressedLinear)}
    assert layers.keys() == planned.specs.keys()
    assert all(mod.terms[0].values.spec.bits == params["bits"] for mod in layers.values())
    assert all(0 < layer.rel_error < 1 for layer in report.layers)
