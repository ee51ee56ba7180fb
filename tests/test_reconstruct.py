"""Block-wise reconstruction (`reconstruct`): the block loss never ends higher than it started, only what
`train` frees changes (codes bit-exact with scales, on the grid with rounding, masks bit-exact), the bytes do
not change, and the whole model gets better."""

import copy
import math

import pytest
import torch
from helpers import MODELS, compress_as_checked, logits, tiny_llama, windows

from lmcompose import Recipe, compress
from lmcompose.algebra import Dense, QuantSpec, Sparse, quantize_rtn
from lmcompose.algebra.invariants import check_step
from lmcompose.algebra.quant import QTensor
from lmcompose.core.dtypes import autocast
from lmcompose.core.errors import IllegalStep, InvariantError
from lmcompose.models.checkpoint import (
    file_tensor_bytes,
    load_compressed,
    save_compressed,
)
from lmcompose.pipeline.blocks import compressed_modules
from lmcompose.rules import explain
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.registry import get_technique
from lmcompose.techniques.train import reconstruct as rc

RTN2 = {"rtn": {"bits": 2, "group_size": 32}}
RTN3 = {"rtn": {"bits": 3, "group_size": 32}}
SSLC = {"sslc": {"ratio": 0.5, "iterations": 3}}
# what each part trains needs a structure that has it
CASES = {
    "scales": [RTN2],
    "zeros": [RTN2],
    "rounding": [RTN3],
    "lowrank": [SSLC, {"rtn": {"bits": 3, "group_size": 16, "target": "sparse"}}],   # float U, V
    "sparse": [SSLC, {"rtn": {"bits": 3, "group_size": 16, "target": "lowrank"}}],   # float sparse values
    "diag": [{"dam": {"rank": 8, "bits": 3, "fold_d": False, "steps": 5}}],         # quantized U, V and a stored d
}


def reconstruct(train, steps=12, **kw):
    return {"reconstruct": {"train": train, "steps": steps, "batch_size": 2, "eval_every": 4, **kw}}


def last(report):
    """The reconstruct step's info of every Linear."""
    return {layer.name: layer.steps[-1] for layer in report.layers}


def stored(model):
    return {n: m.state(n) for n, m in compressed_modules(model).items()}


@pytest.fixture
def measured(monkeypatch):
    """Per block: reconstruct's info, the block loss measured again (independently) on the layers it
    returned, the layers it was given and the layers it returned."""
    seen = []
    real = rc.reconstruct_block

    def spy(cfg, block, prefix, index, layers, inputs, targets, compute_dtype="fp32", device=None):
        out = real(cfg, block, prefix, index, layers, inputs, targets, compute_dtype, device)
        returned = {n: layer for n, (layer, _) in out.items()}
        rc._install(block, prefix, returned)
        again = rc.block_loss(block, inputs, targets, index, lambda: autocast(compute_dtype, "cpu"))
        rc._install(block, prefix, layers)
        seen.append((next(iter(out.values()))[1], again, dict(layers), returned))
        return out
    monkeypatch.setattr(rc, "reconstruct_block", spy)
    return seen


def pairs(measured):
    """(layer given, layer returned) of every Linear reconstruct trained."""
    return [(given[n], returned[n]) for _, _, given, returned in measured for n in given]


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("part", list(CASES))
def test_the_block_loss_never_ends_higher_than_it_started(arch, part, measured):
    train = "scales+zeros" if part == "zeros" else part  # zero points move with the scales (EfficientQAT)
    compress_as_checked(MODELS[arch](), [*CASES[part], reconstruct(train)], windows(8, 16))
    assert len(measured) == (2 if arch == "llama" else 3)
    for info, again, _, _ in measured:  # the loss of the layers it returned is the best it measured
        assert again == pytest.approx(info["loss_best"], rel=1e-6)
        assert info["loss_best"] <= info["loss_before"] and info["loss_best"] <= info["loss_after"]
        assert info["trained"][part] > 0
    assert any(info["loss_best"] < info["loss_before"] for info, *_ in measured), part


def test_a_run_that_only_gets_worse_returns_the_layers_it_was_given(measured):
    compress_as_checked(tiny_llama(), [RTN2, reconstruct("scales", lr={"scales": 50.0})], windows(8, 16))
    for info, _, given, returned in measured:
        assert not info["loss_after"] <= info["loss_before"] and info["loss_best"] == info["loss_before"]
        assert info["best_step"] == 0 and all(returned[n] is given[n] for n in given)


def test_training_scales_keeps_codes_zeros_and_perm_bit_exact(measured):
    steps = [{"gptq": {"bits": 3, "group_size": 16, "act_order": True}}, reconstruct("scales")]
    compress_as_checked(MODELS["gemma3"](), steps, windows(8, 16))
    for m, t in pairs(measured):
        q, q2 = m.terms[0].a, t.terms[0].a
        assert torch.equal(q.codes, q2.codes) and torch.equal(q.zero, q2.zero) and torch.equal(q.perm, q2.perm)
        assert q2.scale.dtype == q.scale.dtype and (q2.scale > 0).all() and not torch.equal(q.scale, q2.scale)


def test_rounding_moves_codes_on_the_same_grid_and_the_bytes_do_not_change(measured, tmp_path):
    model, x = tiny_llama(), windows(8, 16)
    report, planned = compress_as_checked(model, [RTN2, reconstruct("rounding", steps=16)], x)
    for info in last(report).values():
        assert 0 < info["codes_changed"] < 0.5
    for m, t in pairs(measured):
        q, q2 = m.terms[0].a, t.terms[0].a
        assert torch.equal(q.scale, q2.scale) and torch.equal(q.zero, q2.zero)  # only the rounding trained
        assert int(q2.codes.max()) <= q2.spec.maxq and t.spec() == m.spec()
        moved = (q2.codes.int() - q.codes.int()).abs()
        assert int((moved > 0).sum()) > 0 and int(moved.max()) == 1  # floor or ceil of W/s, from RTN's codes
    out = save_compressed(model, tmp_path / "ck")
    for name, m in compressed_modules(model).items():
        assert file_tensor_bytes(out / "model.safetensors", prefix=name + ".") == m.nbytes() == \
            planned.specs[name].nbytes()
    again, _, _ = load_compressed(out)
    assert torch.equal(logits(again, x), logits(model, x))


def test_training_sparse_values_keeps_the_masks_bit_exact(measured):
    compress_as_checked(tiny_llama(), [SSLC, reconstruct("sparse+lowrank")], windows(8, 16))
    for m, t in pairs(measured):
        sparse, new = m.terms[0], t.terms[0]
        assert isinstance(new, Sparse) and torch.equal(sparse.mask, new.mask)
        assert torch.count_nonzero(new.values[~new.mask]) == 0 and new.values.dtype == sparse.values.dtype
        assert not torch.equal(sparse.values, new.values) and not torch.equal(m.terms[1].u, t.terms[1].u)
    measured.clear()  # quantized sparse values: rounding re-decides their codes inside the mask, the mask stays
    steps = [{"wanda": {"sparsity": 0.5}}, {"rtn": {"bits": 3, "group_size": 16, "target": "sparse"}}]
    report, _ = compress_as_checked(tiny_llama(), [*steps, reconstruct("rounding+scales")], windows(8, 16))
    assert all(info["codes_changed"] > 0 for info in last(report).values())
    for m, t in pairs(measured):
        assert torch.equal(m.terms[0].mask, t.terms[0].mask) and (t.to_dense()[~t.terms[0].mask] == 0).all()


def test_save_and_load_give_identical_logits(tmp_path):
    model, x = MODELS["gemma3"](), windows(8, 16)
    compress_as_checked(model, [RTN3, reconstruct("rounding+scales+zeros")], x)
    out = save_compressed(model, tmp_path / "ck")
    again, _, _ = load_compressed(out)
    assert torch.equal(logits(again, x), logits(model, x))


def test_nothing_to_train_is_refused_before_any_weights_load():
    shapes = {"model.layers.0.mlp.up_proj": (32, 64)}
    with pytest.raises(IllegalStep, match=r"steps\[0\]\.reconstruct .*finds nothing to train in dense\[fp16\]"):
        Recipe(steps=[{"reconstruct": {}}]).check(shapes)
    with pytest.raises(IllegalStep, match="finds nothing to train .*it has rounding and scales and zeros"):
        Recipe(steps=[RTN2, {"reconstruct": {"train": "lowrank+sparse"}}]).check(shapes)
    with pytest.raises(IllegalStep, match="finds nothing to train"):  # a symmetric grid has no zero points
        Recipe(steps=[{"rtn": {"bits": 2, "symmetric": True}}, {"reconstruct": {"train": "zeros"}}]).check(shapes)
    with pytest.raises(IllegalStep, match="layer-major"):
        Recipe(schedule="step-major", steps=[RTN2, {"reconstruct": {}}]).check(shapes)
    checked = Recipe(steps=[RTN2, {"reconstruct": {"train": ["scales", "rounding"]}}]).check(shapes)
    assert checked.linear_bytes == Recipe(steps=[RTN2]).check(shapes).linear_bytes  # bytes unchanged
    with pytest.raises(ValueError, match="lr names 'lowrank', which does not train"):
        Recipe(steps=[RTN2, {"reconstruct": {"lr": {"lowrank": 1e-3}}}])
    with pytest.raises(ValueError, match="allowed: one or more of"):
        Recipe(steps=[RTN2, {"reconstruct": {"train": "rounding+weights"}}])


def test_capabilities_it_declares():
    cfg = get_technique("reconstruct")
    assert cfg().train == "scales+rounding" and cfg().target_input == "dense"
    assert cfg().trains and not cfg(steps=0).trains
    assert cfg(train="scales").retrains_grid == {"scale"}
    assert cfg(train="rounding+zeros").retrains_grid == {"codes", "zero"}
    assert cfg(train="lowrank").retrains_grid == frozenset() and not cfg().leaves_grid
    out = explain(Recipe(steps=[RTN2, {"reconstruct": {}}]), {"model.layers.0.mlp.up_proj": (32, 64)})
    assert "R5" in out[1].applies and not out[1].warnings  # it trains the quantization itself: after it


def test_the_invariant_compares_what_a_step_does_not_retrain():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_rtn(w, QuantSpec(3, 32))
    layer = CompressedLinear(64, 16, [Dense(q)])
    scaled = layer.with_terms([Dense(QTensor(q.codes, q.scale * 1.5, q.zero, q.spec))])
    moved = layer.with_terms([Dense(q.with_codes(q.codes.clamp(1, 6) - 1))])
    scales, rounding = get_technique("reconstruct")(train="scales"), get_technique("reconstruct")(train="rounding")
    check_step(layer, scaled, scales)
    with pytest.raises(InvariantError, match="it may retrain only its scale"):
        check_step(layer, moved, scales)
    check_step(layer, moved, rounding)
    off_grid = layer.with_terms([Dense(q.with_codes(torch.full_like(q.codes, 9)))])
    with pytest.raises(InvariantError, match="codes, scales or zeros"):
        check_step(layer, off_grid, rounding)


def test_quant_weight_gradient_is_autograds_straight_through_one():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g)
    q = quantize_rtn(w, QuantSpec(2, 16))
    gidx, maxq = q.group_index(), q.spec.maxq
    scale = q.scale.float().requires_grad_()
    zero = q.zero.float().requires_grad_()
    v = (torch.rand(6, 40, generator=g) - 0.5).requires_grad_()
    up = torch.randn(6, 40, generator=g)
    (rc._QuantWeight.apply(scale, zero, v, w, q.codes, gidx, maxq) * up).sum().backward()
    got = scale.grad, zero.grad, v.grad
    s2, z2, v2 = (t.detach().clone().requires_grad_() for t in (scale, zero, v))
    S, Z = s2[:, gidx], z2[:, gidx]
    t = w / S + v2
    c = torch.clamp(t + (torch.round(t) - t).detach() + Z, 0, maxq)
    (S * (c - Z) * up).sum().backward()
    for a, b in zip(got, (s2.grad, z2.grad, v2.grad)):
        torch.testing.assert_close(a, b)
    codes = rc.rounded_codes(w, scale.detach(), zero.detach(), torch.zeros_like(v), gidx, maxq)
    assert torch.equal(codes, q.codes)  # V = 0 on the RTN grid gives RTN's codes


def test_without_the_rounded_float_rounding_keeps_the_codes():
    model, x = tiny_llama(), windows(8, 16)
    steps = [{"sparsegpt": {"sparsity": 0.5, "bits": 3, "group_size": 16}}]  # quantizes inside its sweep
    report, _ = compress_as_checked(model, [*steps, reconstruct("rounding+scales")], x)
    infos = last(report).values()
    assert all(i["rounding_without_source"] == 1 and i["codes_changed"] == 0 for i in infos)
    assert all(i["trained"]["scales"] > 0 and "rounding" not in i["trained"] for i in infos)


def test_sources_are_dropped_when_the_block_is_left():
    model = tiny_llama()
    compress(model, Recipe.from_dict({"steps": [RTN2]}), windows(4, 16))
    assert all(m.terms[0].a.source is None for m in compressed_modules(model).values())


def test_target_input_compressed_and_bf16_forwards(measured):
    compress_as_checked(tiny_llama(), [RTN2, reconstruct("rounding+scales", target_input="compressed")],
                        windows(8, 16), compute_dtype="bf16")
    assert all(info["loss_best"] <= info["loss_before"] for info, *_ in measured)


# -- the whole model: a tiny Llama trained on a low-entropy Markov language, so that 2 bits hurt -----

def markov(n: int, seqlen: int, seed: int, vocab: int = 128) -> torch.Tensor:
    """Windows of a fixed random chain in which every token has 4 equally likely successors (perplexity 4)."""
    succ = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, seqlen, dtype=torch.long)
    x[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, seqlen):
        x[:, t] = succ[x[:, t - 1], torch.randint(0, 4, (n,), generator=g)]
    return x


@torch.no_grad()
def perplexity(model, x) -> float:
    return math.exp(sum(float(model(input_ids=w[None], labels=w[None]).loss) for w in x) / len(x))


def test_reconstruction_lowers_the_perplexity_of_held_out_windows():
    model = tiny_llama()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(100):
        x = markov(16, 32, seed=100 + step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    calib, held = markov(16, 32, seed=1), markov(8, 32, seed=2)
    dense = perplexity(model, held)
    rtn, tuned = copy.deepcopy(model), copy.deepcopy(model)
    recipe = {"calibration": {"batch_size": 4}, "steps": [{"rtn": {"bits": 2}}]}
    compress(rtn, Recipe.from_dict(recipe), calib)
    recipe["steps"].append({"reconstruct": {"steps": 40}})
    compress(tuned, Recipe.from_dict(recipe), calib)
    before, after = perplexity(rtn, held), perplexity(tuned, held)
    assert before > dense + 0.05  # 2 bits per row hurt
    assert after < before - 0.5 * (before - dense)  # and reconstruction wins back more than half of it
