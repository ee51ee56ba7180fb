"""Exports of compositions: sparse + quantized and mixed-bit results leave lmcompose in compressed-tensors
and GGUF with the values we computed (transformers loads them back), and what a format cannot carry is
refused by name, or merged with merge_dense."""

import json

import pytest
import torch
from helpers import logits, tiny_llama, windows

from lmcompose import Recipe, compress
from lmcompose.algebra.quant import QTensor
from lmcompose.algebra.terms import Sparse
from lmcompose.cli import build_parser
from lmcompose.models.checkpoint import save_compressed
from lmcompose.models.export import CARRIES, FORMATS, STRUCTURES
from lmcompose.models.export.compressed_tensors import export_compressed_tensors
from lmcompose.models.export.gguf import export_gguf
from lmcompose.runtime.linear import CompressedLinear


def compressed(steps, model=None):
    model = tiny_llama() if model is None else model
    compress(model, Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": steps}), windows(n=8))
    return model


def qlayers(model) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def load_ct(path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def assert_same_weights(back, model, exact=True):
    for name, mod in qlayers(model).items():
        got, ours = back.get_submodule(name).weight.detach(), mod.to_dense(torch.float32)
        if exact:
            assert torch.equal(got.half(), ours.half()), name
        else:
            assert (got - ours).abs().max() <= 2e-3 * ours.abs().max(), name


# Mixed bits: every width 2..8 on some Linear, with two group sizes (what sensitivity allocation produces)
MIXED = [{"rtn": {"bits": 3, "group_size": 32, "symmetric": True, "include": ["*.q_proj", "*.k_proj"]}},
         {"rtn": {"bits": 8, "group_size": 64, "symmetric": True, "include": ["*.v_proj"]}},
         {"gptq": {"bits": 4, "group_size": 32, "symmetric": True, "include": ["*.mlp.*"],
                   "exclude": ["*.layers.1.mlp.down_proj"]}},
         {"rtn": {"bits": 6, "group_size": None, "symmetric": False, "include": ["*.layers.1.mlp.down_proj"]}},
         {"rtn": {"bits": 5, "group_size": 64, "symmetric": False, "include": ["*.layers.0.self_attn.o_proj"]}},
         {"rtn": {"bits": 2, "group_size": 32, "symmetric": False, "include": ["*.layers.1.self_attn.o_proj"]}}]

SPARSE_QUANT = {
    "2:4 + gptq int4": [{"sparsegpt": {"pattern": "2:4"}}, {"gptq": {"bits": 4, "group_size": 32, "symmetric": True}}],
    "50% + int8": [{"wanda": {"sparsity": 0.5}}, {"rtn": {"bits": 8, "group_size": 32, "symmetric": True}}],
    "50% + int4 asym": [{"wanda": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 64, "symmetric": False}}],
}


def test_sparse_quantized_layers_keep_their_mask_and_codes():
    """The fixtures really are the compositions the export tests claim (quantized values under a mask)."""
    for steps in SPARSE_QUANT.values():
        for mod in qlayers(compressed(steps)).values():
            (term,) = mod.terms
            assert isinstance(term, Sparse) and isinstance(term.values, QTensor)


# -- compressed-tensors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(SPARSE_QUANT))
def test_compressed_tensors_sparse_quantized_round_trip(case, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    model, x = compressed(SPARSE_QUANT[case]), windows()
    summary = export_compressed_tensors(model, tmp_path / "ct")
    qconfig = json.loads((summary.path / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qconfig)
    sparsity = qconfig["sparsity_config"]
    pattern = "2:4" if case.startswith("2:4") else "unstructured"
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == pattern
    assert sorted(sparsity["targets"]) == sorted(qlayers(model)) and 0.45 < sparsity["global_sparsity"] < 0.55
    back = load_ct(summary.path)
    assert_same_weights(back, model)
    for name, mod in qlayers(model).items():  # the pruned entries come back as exact zeros
        assert (back.get_submodule(name).weight.detach()[~mod.terms[0].mask] == 0).all(), name
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=1e-3)
    # the summary reports both byte counts: the file holds the dense grid, more than our sparse storage
    assert summary.layer_file_bytes > summary.our_bytes
    assert all(r["structure"].startswith(f"sparse {pattern} quantized") for r in summary.layers.values())


def _decompress_each(path, model):
    """Dequantize every Linear of a compressed-tensors file with the scheme whose targets name it, as vLLM
    matches a layer to its config group (compressed-tensors' own decompressor)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    qc = QuantizationConfig.model_validate(json.loads((path / "config.json").read_text())["quantization_config"])
    state = load_file(path / "model.safetensors")
    out = {}
    for group in qc.config_groups.values():
        for name in group.targets:
            own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            out[name] = BaseCompressor.get_value_from_registry(group.format).decompress(own, group)["weight"]
    return qc, out


def test_compressed_tensors_mixed_bits_round_trip(tmp_path):
    model = compressed(MIXED)
    specs = {n: m.terms[0].a.spec for n, m in qlayers(model).items()}
    assert {s.bits for s in specs.values()} == {2, 3, 4, 5, 6, 8}
    summary = export_compressed_tensors(model, tmp_path / "ct")
    qc, weights = _decompress_each(summary.path, model)
    assert len(qc.config_groups) == 6 and sorted(weights) == sorted(specs)
    for group in qc.config_groups.values():  # explicit targets, each Linear in the group of its own grid
        for name in group.targets:
            s = specs[name]
            assert (group.weights.num_bits, group.weights.group_size, group.weights.symmetric) == \
                (s.bits, s.group_size, s.symmetric), name
            assert torch.equal(weights[name].half(), qlayers(model)[name].to_dense(torch.float16)), name
    assert summary.by_stored()["int3 g32 sym"]["linears"] == 4 and summary.notes  # vLLM note on 2/3/5/6 bits


def test_compressed_tensors_mixed_bits_load_in_transformers(tmp_path):
    """transformers' default load applies each group's scheme to its targets. (Its ``dequantize=True`` load
    decodes every dense Linear with the *first* group's scheme (``get_dense_scheme``, transformers 5.25), and
    its default load rejects asymmetric zero points (docs/methods/formats.md): symmetric grids here.)"""
    from transformers import AutoModelForCausalLM

    steps = [s for s in MIXED if next(iter(s.values()))["symmetric"]]
    model, x = compressed(steps), windows()
    assert len({(m.terms[0].a.spec.bits, m.terms[0].a.spec.group_size) for m in qlayers(model).values()}) == 3
    summary = export_compressed_tensors(model, tmp_path / "ct")
    back = AutoModelForCausalLM.from_pretrained(summary.path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=1e-4)


def test_compressed_tensors_writes_float_linears_as_weights(tmp_path):
    model, x = compressed([{"rtn": {"bits": 4, "group_size": 32, "symmetric": True, "include": ["*.mlp.*"]}}]), windows()
    summary = export_compressed_tensors(model, tmp_path / "ct", float_dtype="fp32")
    qconfig = json.loads((summary.path / "config.json").read_text())["quantization_config"]
    assert sorted(t for g in qconfig["config_groups"].values() for t in g["targets"]) == \
        sorted(n for n in qlayers(model) if ".mlp." in n)
    back = load_ct(summary.path)
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=1e-3)


# -- GGUF ------------------------------------------------------------------------------------------------
MIXED_TYPES = {"model.layers.0.self_attn.q_proj": "Q4_0",  # sym 3-bit inside Q4_0
               "model.layers.0.self_attn.v_proj": "Q8_0",  # sym 8-bit
               "model.layers.0.mlp.up_proj": "Q4_0",  # sym 4-bit
               "model.layers.1.mlp.down_proj": "Q8_0",  # asym 6-bit: code - zero fits an int8
               "model.layers.0.self_attn.o_proj": "Q5_1",  # asym 5-bit
               "model.layers.1.self_attn.o_proj": "Q4_0"}  # asym 2-bit: code - zero + 8 fits a nibble


def test_gguf_mixed_bits_round_trip_with_a_type_per_linear(tmp_path):
    import gguf

    model, x = compressed(MIXED), windows()
    summary = export_gguf(model, tmp_path / "m.gguf")
    for name, type_name in MIXED_TYPES.items():
        assert summary.layers[name]["stored"] == type_name, name
    reader = gguf.GGUFReader(summary.path)
    tensors = {t.name: t for t in reader.tensors}
    for name, row in summary.layers.items():
        t = tensors[row["gguf_name"]]
        assert t.tensor_type.name == row["stored"] and int(t.n_bytes) == row["file_bytes"], name
        # our bytes are what we store; GGUF's 2/3/6-bit Linears take a wider type's bytes
        assert row["our_bytes"] == qlayers(model)[name].nbytes()
    assert summary.layers["model.layers.0.self_attn.q_proj"]["file_bytes"] > \
        summary.layers["model.layers.0.self_attn.q_proj"]["our_bytes"]
    assert summary.file_bytes == summary.path.stat().st_size
    back = load_gguf(summary.path)
    for name, mod in qlayers(model).items():
        got, ours = back.get_submodule(name).weight.detach(), mod.to_dense(torch.float32)
        q = mod.terms[0].a
        if summary.layers[name]["stored"] in ("Q4_1", "Q5_1"):  # m = -d·zero rounded to fp16
            assert (got - ours).abs().max() <= (q.scale.float() * q.zero.float()).max() * 2**-11, name
        else:
            assert torch.equal(got, ours), name
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=2e-3)


def test_gguf_sparse_quantized_round_trip(tmp_path):
    model, x = compressed(SPARSE_QUANT["2:4 + gptq int4"]), windows()
    summary = export_gguf(model, tmp_path / "m.gguf")
    assert {r["stored"] for r in summary.layers.values()} == {"Q4_0"}
    back = load_gguf(summary.path)
    for name, mod in qlayers(model).items():
        assert torch.equal(back.get_submodule(name).weight.detach(), mod.to_dense(torch.float32)), name
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=1e-5)


def test_gguf_requantizes_act_order_to_the_nearest_type(tmp_path):
    import gguf
    import gguf.quants

    model = compressed([{"gptq": {"bits": 4, "group_size": 32, "symmetric": True, "act_order": True}}])
    with pytest.raises(ValueError, match="act-order permutation.*allow_requant"):
        export_gguf(model, tmp_path / "m.gguf")
    summary = export_gguf(model, tmp_path / "m.gguf", allow_requant=True)
    assert {r["stored"] for r in summary.layers.values()} == {"Q4_0 requant"}
    (t,) = [t for t in gguf.GGUFReader(summary.path).tensors if t.name == "blk.0.attn_v.weight"]
    ours = qlayers(model)["model.layers.0.self_attn.v_proj"].to_dense(torch.float32).numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(ours, gguf.GGMLQuantizationType.Q4_0),
                                      gguf.GGMLQuantizationType.Q4_0)
    assert (gguf.quants.dequantize(t.data, t.tensor_type) == expected).all()


# -- what no format but dense carries ----------------------------------------------------------------------
REFUSED = [([{"svd": {"ratio": 0.6}}], r"cannot carry low rank: model\.layers\.0\.self_attn\.q_proj is U·V of rank"),
           ([{"sslc": {"ratio": 0.5}}],
            r"cannot carry sum of terms: model\.layers\.0\.self_attn\.q_proj is (sparse \+ lowrank|lowrank \+ sparse)"),
           ([{"rotate": {"online": True}}, {"rtn": {"bits": 4, "group_size": 32, "symmetric": True}}],
            r"cannot carry online rotation: model\.layers\.0\.mlp\.down_proj applies online hadamard")]


@pytest.mark.parametrize("steps,match", REFUSED, ids=["lowrank", "sum", "rotation"])
def test_exports_refuse_a_structure_by_name_and_offer_the_dense_merge(steps, match, tmp_path):
    model, x = compressed(steps), windows()
    for export, out in ((export_compressed_tensors, tmp_path / "ct"), (export_gguf, tmp_path / "m.gguf")):
        with pytest.raises(ValueError, match=match + r".*--merge-dense.*--format dense"):
            export(model, out)
        assert not out.exists()
    summary = export_gguf(model, tmp_path / "m.gguf", merge_dense=True, float_dtype="fp32")
    assert any(r["stored"].endswith("merged") for r in summary.layers.values())
    torch.testing.assert_close(logits(load_gguf(summary.path), x), logits(model, x), rtol=0, atol=1e-4)
    summary = export_compressed_tensors(model, tmp_path / "ct", merge_dense=True, float_dtype="fp32")
    back = load_ct(summary.path) if (json.loads((summary.path / "config.json").read_text())
                                     .get("quantization_config")) else _plain(summary.path)
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=1e-3)  # fp16 scales, as above


def _plain(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# -- command line ----------------------------------------------------------------------------------------
def test_cli_export_list_prints_what_each_format_carries(capsys):
    parser = build_parser()
    args = parser.parse_args(["export", "--list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for structure in STRUCTURES:
        assert structure in out
    assert all(f in out for f in FORMATS)
    assert CARRIES["gguf"]["low rank"] == "no" and CARRIES["dense"]["low rank"] == "merged"
    args = parser.parse_args(["export"])
    with pytest.raises(ValueError, match="export needs RUN_DIR, --format, --out"):
        args.func(args)


def test_cli_export_prints_both_byte_counts_and_merges_on_request(tmp_path, capsys):
    model = compressed([{"sparsegpt": {"pattern": "2:4"}}, {"gptq": {"bits": 4, "group_size": 32, "symmetric": True}}])
    run = save_compressed(model, tmp_path / "run")
    parser = build_parser()
    args = parser.parse_args(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--verbose",
                              "--no-tokenizer"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Q4_0" in out and "in the file" in out and "model.layers.1.mlp.down_proj" in out
    lowrank = compressed([{"svd": {"ratio": 0.6}}])
    run = save_compressed(lowrank, tmp_path / "lr")
    args = parser.parse_args(["export", str(run), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")])
    with pytest.raises(ValueError, match="cannot carry low rank.*--merge-dense"):
        args.func(args)
    args = parser.parse_args(["export", str(run), "--format", "compressed-tensors", "--out", str(tmp_path / "ct"),
                              "--merge-dense", "--no-tokenizer"])
    assert args.func(args) == 0
    assert "merged" in capsys.readouterr().out
