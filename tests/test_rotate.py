"""rotate: an orthogonal rotation of the residual stream fused into the weights (R1, R2, R4) leaves the
dense model's logits unchanged, composes with quantization, saves and loads with its online operations,
and is refused where the structure is not one it knows or a format cannot carry it."""

import json

import pytest
import torch
from helpers import MODELS, compress_as_checked, logits, tiny_gemma3, tiny_llama, windows
from torch import nn

from lmcompose import Recipe, compress
from lmcompose.algebra.ops import InputRotation, InputRotationSpec
from lmcompose.cli import main
from lmcompose.core.errors import IllegalStep
from lmcompose.models.checkpoint import file_tensor_bytes, load_compressed, save_compressed
from lmcompose.models.export.compressed_tensors import export_compressed_tensors
from lmcompose.models.export.dense import export_dense
from lmcompose.pipeline.blocks import linear_shapes, model_nbytes
from lmcompose.pipeline.structure import StructureError
from lmcompose.rules import explain
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.runtime.model_ops import ModelOp, model_ops

VARIANTS = {"R1": {}, "R1+R2": {"per_head": True}, "R1+R4": {"online": True},
            "R1+R2+R4 orthogonal": {"per_head": True, "online": True, "transform": "orthogonal", "seed": 5},
            "R1+R2+R4+output": {"per_head": True, "online": True, "output": True},
            "block 16, R1+R2+R4+output": {"per_head": True, "online": True, "output": True, "block_size": 16}}
READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def rotate(model, x=None, float_dtype="fp32", **params):
    recipe = Recipe.from_dict({"float_dtype": float_dtype, "calibration": {"batch_size": 2},
                               "steps": [{"rotate": params}]})
    return compress(model, recipe, windows(2, 16) if x is None else x)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(MODELS))
def test_rotation_leaves_the_dense_logits_unchanged(family, variant):
    model, x = MODELS[family](), windows(2, 32)
    dense, before = logits(model, x), weights(model)
    report = rotate(model, **VARIANTS[variant])
    after = logits(model, x)
    assert float((after - dense).abs().max()) <= 1e-4 * float(dense.abs().max())
    changed = [k for k, v in weights(model).items() if k in before and not torch.equal(v, before[k])]
    assert any("embed_tokens" in k for k in changed) and any("q_proj" in k for k in changed)
    (record,) = report.transforms
    assert record["technique"] == "rotate" and record["online_ops_bytes"] == 0
    assert record["block"] == VARIANTS[variant].get("block_size", 0)
    assert record["check"]["logits_error"] < 1e-5 and record["check"]["max_block_error"] < 1e-5
    online = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    if VARIANTS[variant].get("online"):
        assert online == record["online"] == [n for n in linear_shapes(model) if n.endswith("down_proj")]
        assert all(isinstance(model.get_submodule(n).input_ops[0], InputRotation) for n in online)
    else:
        assert online == []
    if VARIANTS[variant].get("per_head"):
        assert record["per_head"]["pairs"] == ["self_attn.v_proj -> self_attn.o_proj"]
    outputs = [o.module for o in model_ops(model) if o.kind == "rotate_output" and o.module.endswith("_proj")]
    if VARIANTS[variant].get("output"):  # every residual reader, and nothing else
        assert sorted(outputs) == sorted(record["outputs"]) == sorted(n for n in linear_shapes(model)
                                                                      if n.endswith(READERS))
    else:
        assert outputs == record.get("outputs", []) == []


def test_untied_head_absorbs_the_final_norm_and_needs_no_online_op():
    model = tiny_llama()
    rotate(model)
    assert model_ops(model) == []
    assert torch.equal(model.model.norm.weight, torch.ones(64))  # folded into the head
    assert all(torch.equal(b.input_layernorm.weight, torch.ones(64)) for b in model.model.layers)


def test_gemma3_tied_head_and_post_norms_run_online_at_no_bytes():
    model = tiny_gemma3()
    total = model_nbytes(model, "fp32")
    report = rotate(model)
    ops = model_ops(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: one matrix, rotated
    assert [o.kind for o in ops].count("rotate_output") == 2 * 3  # two post-norms per block
    assert [o.module for o in ops if o.kind == "conjugate"] == ["model.norm"]
    assert report.transforms[0]["model_ops"] == [o.meta() for o in ops]
    assert model_nbytes(model, "fp32") == total and sum(o.nbytes() for o in ops) == 0
    assert not any(k.startswith("_") or "hook" in k for k in model.state_dict())  # no new state-dict keys


def test_online_linears_are_planned_with_their_rotation_at_zero_bytes():
    shapes = linear_shapes(tiny_llama())
    steps = [{"rotate": {"online": True}}, {"rtn": {"bits": 4, "group_size": 32}}]
    rotated = Recipe.from_dict({"steps": steps}).check(shapes)
    plain = Recipe.from_dict({"steps": steps[1:]}).check(shapes)
    assert rotated.linear_bytes == plain.linear_bytes
    down = rotated.specs["model.layers.0.mlp.down_proj"]
    assert down.input_ops == (InputRotationSpec(128, "hadamard", 2),)
    assert rotated.specs["model.layers.0.mlp.up_proj"].input_ops == ()


@pytest.mark.parametrize("output, block", [(False, 0), (True, 0), (True, 32)])
@pytest.mark.parametrize("family", list(MODELS))
def test_rotated_then_quantized_saves_loads_identically(family, output, block, tmp_path):
    model, x = MODELS[family](), windows()
    steps = [{"rotate": {"online": True, "per_head": True, "output": output, "block_size": block}},
             {"gptq": {"bits": 4, "group_size": 64}}]
    report, planned = compress_as_checked(model, steps)
    out = save_compressed(model, tmp_path / "ck", report=report.to_dict())
    assert file_tensor_bytes(out / "model.safetensors") == report.total_bytes == model_nbytes(model, "fp16")
    meta = json.loads((out / "lmcompose.json").read_text())
    assert meta["model_ops"] == [o.meta() for o in model_ops(model)]
    again, _, _ = load_compressed(out)
    assert model_ops(again) == model_ops(model)
    down = again.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(down.input_ops[0], InputRotation) and down.spec() == planned.specs["model.layers.1.mlp.down_proj"]
    assert torch.equal(logits(again, x), logits(model, x))
    if output:  # each output rotation went with its Linear when GPTQ replaced it by its compressed form
        q = model.get_submodule("model.layers.1.self_attn.q_proj")
        assert isinstance(q, CompressedLinear) and len(q._forward_hooks) == 1
        assert sum(o.module.endswith("_proj") for o in model_ops(again)) == 5 * len(model.model.layers)


def test_output_rotation_mixes_the_rows_and_survives_reconstruct_and_recover():
    """W ← Qᵀ·W spreads a row with large entries over all rows (what QuIP's output side is for); the rotated
    model then quantizes, reconstructs and distills through its hooks, which stay on the compressed Linears."""
    model, x = tiny_llama(), windows()
    q = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[3] *= 50  # one outlier row
    dense = logits(model, x)
    rows = lambda w: w.norm(dim=1)  # noqa: E731
    assert float(rows(q.weight).max() / rows(q.weight).median()) > 20
    steps = [{"rotate": {"output": True}}, {"rtn": {"bits": 8, "group_size": 32}},
             {"reconstruct": {"train": "scales", "steps": 2}}]
    recipe = Recipe.from_dict({"float_dtype": "fp32", "calibration": {"batch_size": 2}, "steps": steps,
                               "recover": {"steps": 2, "train": "scales", "lr": 1e-6}})
    compress(model, recipe, x)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    w = q.terms_weight()
    assert float(rows(w).max() / rows(w).median()) < 5  # the outlier spread over the rows
    assert len(q._forward_hooks) == 1
    assert float((logits(model, x) - dense).abs().max()) <= 0.05 * float(dense.abs().max())  # 8 bits: close


def test_a_checkpoint_with_an_unknown_model_op_is_refused(tmp_path):
    model = tiny_gemma3()
    report, _ = compress_as_checked(model, [{"rotate": {}}, {"rtn": {"bits": 4, "group_size": 32}}])
    out = save_compressed(model, tmp_path / "ck", report=report.to_dict())
    meta = json.loads((out / "lmcompose.json").read_text())
    meta["model_ops"][0]["kind"] = "rotate_twice"
    (out / "lmcompose.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown model op kind 'rotate_twice'"):
        load_compressed(out)
    with pytest.raises(ValueError, match="not known"):
        ModelOp("rotate_twice", "model.norm", model_ops(model)[0].transform)


def test_exports_refuse_what_they_cannot_carry_and_dense_merges_input_rotations(tmp_path):
    from transformers import AutoModelForCausalLM

    gemma = tiny_gemma3()
    compress_as_checked(gemma, [{"rotate": {}}, {"rtn": {"bits": 4, "group_size": 32}}])
    for export in (export_dense, export_compressed_tensors):
        with pytest.raises(ValueError, match=r"cannot carry the model's online operations \(rotate_output on "
                                             r"model\.layers\.0\.post_attention_layernorm"):
            export(gemma, tmp_path / export.__name__)
    llama, x = tiny_llama(), windows()
    compress_as_checked(llama, [{"rotate": {"online": True}}, {"rtn": {"bits": 4, "group_size": 32}}])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj applies online hadamard.*--format dense"):
        export_compressed_tensors(llama, tmp_path / "ct")
    export_dense(llama, tmp_path / "dense", dtype="fp32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    assert torch.allclose(logits(plain, x), logits(llama, x), atol=1e-4)


def test_rotate_must_lead_and_explain_names_the_rule(tmp_path, capsys):
    shapes = linear_shapes(tiny_llama(layers=1))
    with pytest.raises(IllegalStep, match="must come before every step that compresses"):
        Recipe.from_dict({"steps": [{"rtn": {"bits": 4}}, {"rotate": {}}]}).check(shapes)
    (first, _) = explain(Recipe.from_dict({"steps": [{"rotate": {}}, {"rtn": {"bits": 4}}]}), shapes)
    assert first.family == "transform" and first.applies[0] == "R9"
    model_dir, recipe = tmp_path / "m", tmp_path / "r.yaml"
    tiny_llama(layers=1).save_pretrained(model_dir, safe_serialization=True)
    recipe.write_text("steps:\n  - rotate: {online: true}\n  - rtn: {bits: 4}\n")
    assert main(["recipe", "explain", str(recipe), "--model", str(model_dir)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "R9" in printed and "before every pruning, low-rank and quantization step" in printed


def test_settings_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="does not apply to rotate"):
        Recipe.from_dict({"steps": [{"rotate": {"include": ["*q_proj"]}}]})
    with pytest.raises(ValueError, match="only applies with online: true"):
        Recipe.from_dict({"steps": [{"rotate": {"online_include": ["*o_proj"]}}]})
    with pytest.raises(ValueError, match="selects no Linear"):
        rotate(tiny_llama(), online=True, online_include=["*nothing"])


# -- structures it does not know ------------------------------------------------------------------------
def test_a_layernorm_is_refused_by_name():
    model = tiny_llama()
    model.model.layers[1].post_attention_layernorm = nn.LayerNorm(64, bias=False)
    with pytest.raises(StructureError, match=r"model\.layers\.1\.post_attention_layernorm \(LayerNorm\) .*not an RMS"):
        rotate(model)
    model = tiny_llama()
    model.model.layers[0].input_layernorm = nn.LayerNorm(64)
    with pytest.raises(StructureError, match=r"model\.layers\.0\.input_layernorm \(LayerNorm\) has per-channel"):
        rotate(model)


def test_parallel_attention_is_refused():
    model = tiny_llama(layers=1)
    layer = model.model.layers[0]
    forward = type(layer).forward

    def parallel(hidden_states, *args, **kwargs):  # h + attn(norm1(h)) + mlp(norm2(h)): one residual add
        attn = forward(layer, hidden_states, *args, **kwargs)
        attn = attn[0] if isinstance(attn, tuple) else attn
        mlp = layer.mlp(layer.post_attention_layernorm(hidden_states))
        return attn + mlp

    layer.forward = parallel
    with pytest.raises(StructureError, match="residual update"):
        rotate(model)


def test_per_head_is_refused_where_the_values_are_normalized():
    def normalized_values():
        model = tiny_llama(layers=1)
        attn = model.model.layers[0].self_attn
        attn.v_proj = nn.Sequential(attn.v_proj, nn.RMSNorm(32))
        return model

    rotate(normalized_values())  # R1 alone is fine on this structure
    with pytest.raises(StructureError, match=r"per_head: .*self_attn\.v_proj\.1 reads self_attn\.v_proj\.0"):
        rotate(normalized_values(), per_head=True)


def test_a_compressed_model_is_refused():
    model = tiny_llama()
    compress_as_checked(model, [{"rtn": {"bits": 4}}])
    with pytest.raises(IllegalStep, match="needs a dense model"):
        rotate(model)


def test_a_structure_only_the_numerical_check_catches_leaves_the_model_unchanged():
    model, x = tiny_llama(), windows(2, 16)
    mlp = model.model.layers[1].mlp  # up_proj reads norm(h)², which no rotation commutes with
    mlp.forward = lambda h: mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h.square()))
    dense, before = logits(model, x), weights(model)
    with pytest.raises(StructureError, match=r"block model\.layers\.1: the rotated block does not reproduce"):
        rotate(model)
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items()) and model_ops(model) == []
    assert torch.equal(logits(model, x), dense)


def test_awq_does_not_fold_into_a_linear_whose_output_is_rotated_online():
    """up_proj carries an online output rotation: scaling its rows no longer scales down_proj's input
    channels, so AWQ finds no producer for down_proj (and the dense function is kept exactly)."""
    model, x = tiny_llama(), windows()
    dense = logits(model, x)
    recipe = Recipe.from_dict({"float_dtype": "fp32", "calibration": {"batch_size": 2},
                               "steps": [{"rotate": {"output": True}}, {"awq": {"bits": 4, "group_size": 32}}]})
    layers = {l["name"]: l["steps"][0] for l in compress(model, recipe, x).to_dict()["layers"]}
    assert layers["model.layers.0.mlp.down_proj"]["scaled"] == "none"
    assert layers["model.layers.0.mlp.up_proj"]["scaled"] == "fold"  # into the norm: unaffected
    assert float((logits(model, x) - dense).abs().max()) <= 1e-4 * float(dense.abs().max())


def test_recipes_written_before_the_output_side_keep_their_hash():
    before = Recipe.from_dict({"steps": [{"rotate": {"per_head": True}}, {"rtn": {"bits": 4}}]})
    assert "output" not in before.to_dict()["steps"][0]["rotate"]
    assert before.hash() == Recipe.from_dict(before.to_dict()).hash()
    on = Recipe.from_dict({"steps": [{"rotate": {"per_head": True, "output": True}}, {"rtn": {"bits": 4}}]})
    assert on.to_dict()["steps"][0]["rotate"]["output"] is True and on.hash() != before.hash()


def test_output_side_and_r4_on_a_stream_reader_are_refused_before_anything_changes():
    model = tiny_llama()
    before = weights(model)
    with pytest.raises(IllegalStep, match="q_proj.*reads the residual stream"):
        rotate(model, online=True, online_include=["*q_proj"], output=True)
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items()) and model_ops(model) == []
