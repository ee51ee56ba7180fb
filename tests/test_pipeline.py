"""The sequential pipeline on tiny Llama and Gemma-3 models built in code (no family-specific code)."""

import pytest
import torch
from helpers import MODELS, logits, tiny_llama, windows

from lmcompose import Recipe, compress
from lmcompose.pipeline.blocks import find_blocks, linear_shapes, other_param_bytes
from lmcompose.pipeline.passes import advance
from lmcompose.pipeline.sequential import capture_inputs, observe, run_block
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.base import Technique


def recipe(*steps, **kw):
    return Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": list(steps), **kw})


@pytest.mark.parametrize("family", list(MODELS))
def test_identity_recipe_leaves_logits_unchanged(family):
    model, x = MODELS[family](), windows()
    before = logits(model, x)
    compress(model, Recipe(calibration={"batch_size": 2}, float_dtype="fp32"), x)  # no step (a file needs one)
    assert torch.equal(logits(model, x), before)


@pytest.mark.parametrize("family", list(MODELS))
def test_captured_inputs_replay_the_model_exactly(family):
    # Gemma-3 windows of 32 tokens exceed its sliding window of 8: each block needs its own mask.
    model, x = MODELS[family](), windows(seqlen=32)
    out = model(input_ids=x, output_hidden_states=True, use_cache=False)
    inputs = capture_inputs(model, x, batch_size=3, device="cpu")
    _, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        inputs.hidden = run_block(block, inputs, i)
    replay = torch.cat(inputs.hidden)
    final = model.model.norm(replay)
    torch.testing.assert_close(final, out.hidden_states[-1], rtol=1e-5, atol=1e-5)


def test_advance_equals_run_block_and_leaves_a_list_held_elsewhere_alone():
    model = tiny_llama(layers=2)
    inputs = capture_inputs(model, windows(n=6), 2, "cpu")
    _, blocks = find_blocks(model)
    held = inputs.hidden  # e.g. a pass's block-0 inputs kept for the next pass
    before = [h.clone() for h in held]
    expected = run_block(blocks[0], inputs, 0)
    advance(blocks[0], inputs, 0)
    assert inputs.hidden is not held and len(inputs.hidden) == 3
    assert all(torch.equal(a, b) for a, b in zip(inputs.hidden, expected))
    assert all(torch.equal(a, b) for a, b in zip(held, before))


def test_groups_follow_execution_and_shared_inputs():
    model = tiny_llama()
    inputs = capture_inputs(model, windows(), 2, "cpu")
    prefix, blocks = find_blocks(model)
    targets = {f"{prefix}.0.{n}": m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    stats, groups = observe(blocks[0], inputs, 0, targets)
    short = [[n.rsplit(".", 1)[1] for n in g] for g in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert stats[f"{prefix}.0.self_attn.q_proj"] is not None
    assert stats[f"{prefix}.0.self_attn.q_proj"].gram is stats[f"{prefix}.0.self_attn.k_proj"].gram


class Explode(Technique):
    name = "explode_for_test"

    def plan(self, spec):
        return spec

    def apply(self, layer, stats):
        raise RuntimeError("boom")


def test_hooks_are_removed_after_a_failure_mid_block():
    model = tiny_llama()
    r = Recipe(calibration={"batch_size": 2}, steps=[Explode()])
    with pytest.raises(RuntimeError, match="boom"):
        compress(model, r, windows())
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert "forward" not in vars(m)
    model(input_ids=windows())  # still a working model


@pytest.mark.parametrize("family", list(MODELS))
def test_nm_masks_and_report(family):
    model, x = MODELS[family](), windows()
    report = compress(model, recipe({"magnitude": {"pattern": "2:4"}}), x)
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == len(linear_shapes(MODELS[family]())) == len(report.layers)
    for layer in layers:
        w = layer.to_dense()
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all()
    assert all(0 < l.rel_error < 1 for l in report.layers)


def test_error_falls_as_bits_rise():
    errs = []
    for bits in (2, 3, 4, 8):
        report = compress(tiny_llama(), recipe({"rtn": {"bits": bits, "group_size": 32}}), windows())
        errs.append(sum(l.rel_error for l in report.layers))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3


def compressed_weights(model):
    return {n: m.to_dense() for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def assert_same_model(a, b, x):
    wa, wb = compressed_weights(a), compressed_weights(b)
    assert wa.keys() == wb.keys() and len(wa) == 14
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert torch.equal(logits(a, x), logits(b, x))


def compress_fp32(*steps, model=None, **kw):
    """Compress in fp32 storage and compute, so nothing is rounded between or after steps and split runs
    can be compared bit for bit. Returns the model and the report."""
    model = model if model is not None else tiny_llama()
    report = compress(model, recipe(*steps, float_dtype="fp32", **kw), windows(), compute_dtype="fp32")
    return model, report


# Wanda reads its inputs' statistics, and RTN changes what the next block receives: layer-major prunes
# block 1 on the output of a pruned and quantized block 0, step-major on the output of a pruned block 0.
PRUNE, QUANT = {"wanda": {"sparsity": 0.5}}, {"rtn": {"bits": 2, "group_size": 32}}


def only_block(step, i):
    ((name, params),) = step.items()
    return {name: {**params, "include": [f"model.layers.{i}.*"]}}


def test_schedules_agree_for_one_step():
    a, _ = compress_fp32(PRUNE, schedule="layer-major")
    b, _ = compress_fp32(PRUNE, schedule="step-major")
    assert_same_model(a, b, windows())


def test_step_major_runs_each_step_over_the_whole_model_before_the_next():
    step_major, rep = compress_fp32(PRUNE, QUANT, schedule="step-major")
    pruned, _ = compress_fp32(PRUNE)
    reference, _ = compress_fp32(QUANT, model=pruned)  # a second compress call, on the pruned model
    assert_same_model(step_major, reference, windows())
    assert all([s["technique"] for s in l.steps] == ["wanda", "rtn"] for l in rep.layers)


def test_layer_major_finishes_each_block_before_the_next_and_differs_from_step_major():
    layer_major, rep = compress_fp32(PRUNE, QUANT, schedule="layer-major")
    reference = tiny_llama()
    for i in range(2):  # one compress call per block, on a model whose earlier blocks are final
        compress_fp32(only_block(PRUNE, i), only_block(QUANT, i), model=reference)
    assert_same_model(layer_major, reference, windows())
    assert all([s["technique"] for s in l.steps] == ["wanda", "rtn"] for l in rep.layers)
    # block 0 sees the same inputs under both schedules; block 1 does not
    step_major, _ = compress_fp32(PRUNE, QUANT, schedule="step-major")
    lm, sm = compressed_weights(layer_major), compressed_weights(step_major)
    assert all(torch.equal(lm[n], sm[n]) for n in lm if n.startswith("model.layers.0."))
    assert not all(torch.equal(lm[n], sm[n]) for n in lm if n.startswith("model.layers.1."))


def test_checked_bytes_equal_real_bytes():
    r = recipe({"magnitude": {"ratio": 0.4}}, {"rtn": {"bits": 4, "group_size": 24}})
    model = tiny_llama()
    planned = r.check(linear_shapes(model), other_param_bytes(model))
    report = compress(model, r, windows())
    assert report.linear_bytes == planned.linear_bytes
    assert report.total_bytes == planned.total_bytes
    for layer in report.layers:
        assert layer.nbytes == planned.specs[layer.name].nbytes()


GROUPS = (["*q_proj", "*k_proj", "*v_proj"], ["*o_proj"], ["*gate_proj", "*up_proj"], ["*down_proj"])


def test_true_sequential_observes_each_group_after_the_previous():
    x = windows()
    seq, rep = compress_fp32({"wanda": {"sparsity": 0.5, "true_sequential": True}})
    # the reference: one layer-major step per group, so each group is observed after the previous ones
    reference, _ = compress_fp32(*({"wanda": {"sparsity": 0.5, "include": g}} for g in GROUPS))
    assert_same_model(seq, reference, x)
    assert len(rep.layers) == 14 and all(len(l.steps) == 1 for l in rep.layers)
    # without it all of block 0 is observed on dense inputs: its first group agrees, each later one does not
    plain, _ = compress_fp32({"wanda": {"sparsity": 0.5}})
    ws, wp = compressed_weights(seq), compressed_weights(plain)
    block0 = "model.layers.0."
    assert all(torch.equal(ws[block0 + n], wp[block0 + n]) for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                                       "self_attn.v_proj"))
    for later in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert not torch.equal(ws[block0 + later], wp[block0 + later]), later


def test_layer_records_default_to_not_skipped():
    from lmcompose.pipeline.records import LayerRecord

    assert LayerRecord("x").skipped is None and LayerRecord.left_unchanged("x", "why").skipped == "why"


def test_observe_stops_after_the_last_linear_and_keeps_the_statistics():
    # After the first batch, observe skips what follows the last Linear's input (down_proj's product):
    # the statistics are those of full forwards.
    from lmcompose.core.stats import StatsAccumulator
    model = tiny_llama()
    inputs = capture_inputs(model, windows(n=6), 2, "cpu")
    prefix, blocks = find_blocks(model)
    targets = {f"{prefix}.0.{n}": m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    down = blocks[0].mlp.down_proj
    full = {name: StatsAccumulator(m.in_features) for name, m in targets.items()}
    handles = [m.register_forward_pre_hook(lambda mod, a, name=name: full[name].update(a[0]))
               for name, m in targets.items()]
    run_block(blocks[0], inputs, 0)
    for h in handles:
        h.remove()
    ran = []
    handle = down.register_forward_hook(lambda *a: ran.append(1))
    stats, _ = observe(blocks[0], inputs, 0, targets)
    handle.remove()
    assert len(ran) == 1  # the first batch only
    for name in targets:
        expected = full[name].result()
        assert torch.equal(stats[name].gram, expected.gram)
        assert torch.equal(stats[name].absmax, expected.absmax)
        assert stats[name].n_tokens == expected.n_tokens


@pytest.mark.parametrize("step", [
    {"gptq": {"bits": 4, "group_size": 32, "act_order": True, "static_groups": True}},
    {"gptq": {"bits": 3, "group_size": 16, "act_order": True}},   # stored permutation
    {"gptq": {"bits": 4}},
    {"rtn": {"bits": 4, "group_size": 32}},
])
def test_stacked_solve_equals_one_solve_per_linear(step, monkeypatch):
    # q/k/v and gate/up read one input: their rows are solved as one matrix, with the same result.
    from lmcompose.pipeline import sequential
    runs, solved = {}, []
    real = sequential.apply_stacked
    monkeypatch.setattr(sequential, "apply_stacked", lambda *a: solved.append(real(*a)) or solved[-1])
    for stacked in (True, False):
        if not stacked:
            monkeypatch.setattr(sequential, "apply_stacked", lambda *a, **k: None)
        model = tiny_llama()
        report = compress(model, recipe(step, float_dtype="fp32"), windows())
        runs[stacked] = (model, {l.name: l for l in report.layers})
    assert len(solved) == 4 and all(len(r) in (2, 3) for r in solved)  # q/k/v and gate/up of 2 blocks
    (a, rec_a), (b, rec_b) = runs[True], runs[False]
    for name, m in a.named_modules():
        if isinstance(m, CompressedLinear):
            qa, qb = m.terms[0].a, b.get_submodule(name).terms[0].a
            assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.scale, qb.scale), name
            assert (qa.zero is None and qb.zero is None) or torch.equal(qa.zero, qb.zero), name
            assert (qa.perm is None and qb.perm is None) or torch.equal(qa.perm, qb.perm), name
            assert qa.codes.is_contiguous() and qa.codes.untyped_storage().nbytes() == qa.codes.numel()
            sa, sb = rec_a[name].steps[-1], rec_b[name].steps[-1]
            assert sa["rel_error"] == sb["rel_error"]
            if "obs_loss" in sa:  # the layer's share of the stacked sweep's loss (fp64 sums, other order)
                assert sa["obs_loss"] == pytest.approx(sb["obs_loss"], rel=1e-12)
