"""Exports load back in transformers with the codes we computed: compressed-tensors and GGUF."""

import json

import pytest
import torch
from helpers import logits, tiny_gemma3, tiny_llama, windows

from lmcompose import Recipe, compress
from lmcompose.models.checkpoint import save_compressed
from lmcompose.cli import build_parser
from lmcompose.models.export.compressed_tensors import export_compressed_tensors, pack_int32
from lmcompose.models.export.gguf import export_gguf
from lmcompose.runtime.linear import CompressedLinear


def quantized(step: dict, model=None, x=None):
    model = tiny_llama() if model is None else model
    x = windows() if x is None else x
    compress(model, Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": [step]}), x)
    return model


def qlayers(model) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def byte_bpe():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20, "hello world, compressed models"],
                            vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")


# -- compressed-tensors --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_packing_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 2**bits, (6, 37), generator=torch.Generator().manual_seed(bits))
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits), helpers.pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.T, bits).T, helpers.pack_to_int32(signed, bits, packed_dim=0))


CT_CASES = [{"rtn": {"bits": 4, "group_size": 32, "symmetric": False}},
            {"rtn": {"bits": 8, "group_size": 32, "symmetric": True}},
            {"rtn": {"bits": 4, "group_size": None, "symmetric": False}},
            {"gptq": {"bits": 4, "group_size": 32, "symmetric": True}},
            {"gptq": {"bits": 4, "group_size": 32, "symmetric": False}},
            {"gptq": {"bits": 8, "group_size": 32, "symmetric": False}},
            {"gptq": {"bits": 8, "group_size": 32, "symmetric": True, "act_order": True, "static_groups": True}}]


@pytest.mark.parametrize("step", CT_CASES, ids=lambda s: json.dumps(s))
def test_compressed_tensors_loads_back_with_our_weights(step, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, x = quantized(step), windows()
    out = export_compressed_tensors(model, tmp_path / "ct").path
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    assert qc.format == "pack-quantized" and sum(len(g.targets) for g in qc.config_groups.values()) == 14
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    for name, mod in qlayers(model).items():
        # compressed-tensors dequantizes in the fp16 scale dtype: exactly our fp16-rounded weight
        assert torch.equal(back.get_submodule(name).weight.detach().half(), mod.to_dense(torch.float16)), name
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=1e-3)


def test_compressed_tensors_default_load_decompresses_on_first_forward(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    # symmetric only: with dequantize=False, transformers 5.23 + compressed-tensors 0.20 allocate an
    # *unpacked* weight_zero_point, while the package's own compress() (and vLLM) write it packed
    model, x = quantized({"rtn": {"bits": 4, "group_size": 32, "symmetric": True}}), windows()
    back = AutoModelForCausalLM.from_pretrained(export_compressed_tensors(model, tmp_path / "ct").path,
                                                dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=1e-3)


@pytest.mark.parametrize("step,match", [
    ({"gptq": {"bits": 4, "group_size": 32, "act_order": True}}, "act-order permutation"),
    ({"rtn": {"bits": 4, "group_size": 24}}, "group_size=24 does not divide in_features=64"),
    ({"svd": {"ratio": 0.5}}, r"cannot carry low rank: model\.layers\.0\.self_attn\.q_proj is U·V of rank"),
])
def test_compressed_tensors_refuses_what_it_cannot_represent(step, match, tmp_path):
    model = quantized(step)
    with pytest.raises(ValueError, match=match):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


# -- GGUF ------------------------------------------------------------------------------------------------
GGUF_CASES = [({"rtn": {"bits": 4, "group_size": 32, "symmetric": True}}, "Q4_0"),
              ({"rtn": {"bits": 4, "group_size": 96, "symmetric": True}}, "Q4_0"),  # short last group (128 = 96+32)
              ({"gptq": {"bits": 4, "group_size": 32, "symmetric": False}}, "Q4_1"),
              ({"gptq": {"bits": 8, "group_size": 64, "symmetric": True}}, "Q8_0"),
              ({"gptq": {"bits": 5, "group_size": None, "symmetric": True}}, "Q5_0"),
              ({"rtn": {"bits": 5, "group_size": 32, "symmetric": False}}, "Q5_1")]


def _load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("step,type_name", GGUF_CASES, ids=[c[1] for c in GGUF_CASES])
def test_gguf_loads_back_with_our_weights(step, type_name, tmp_path):
    import gguf

    model, x = quantized(step), windows()
    path = export_gguf(model, tmp_path / "m.gguf").path
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.1.attn_q.weight"] == types["blk.0.ffn_down.weight"] == type_name
    assert types["token_embd.weight"] == "F16" and types["output_norm.weight"] == "F32"
    back = _load_gguf(path)
    for name, mod in qlayers(model).items():
        ours, got = mod.to_dense(torch.float32), back.get_submodule(name).weight.detach()
        q = mod.terms[0].a
        if q.zero is None:  # d·(q - mid): exact
            assert torch.equal(got, ours), name
        else:  # d·q + m, with m = -d·zero rounded to fp16: at most half an fp16 ulp of m off
            bound = (q.scale.float() * q.zero.float()).max() * 2**-11
            assert (got - ours).abs().max() <= bound, name
    atol = 1e-5 if step[next(iter(step))]["symmetric"] else 2e-3
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=atol)


def test_gguf_q4_1_codes_are_bit_exact(tmp_path):
    import gguf

    model = quantized({"rtn": {"bits": 4, "group_size": 64, "symmetric": False}})
    path = export_gguf(model, tmp_path / "m.gguf").path
    (t,) = [t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_v.weight"]  # v: rows not permuted
    q = qlayers(model)["model.layers.0.self_attn.v_proj"].terms[0].a
    blocks = torch.from_numpy(t.data.copy()).reshape(-1, 20)  # Q4_1: d, m (fp16), 16 bytes of nibbles
    nibbles = blocks[:, 4:].to(torch.int32)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=1)
    assert torch.equal(codes, q.codes.to(torch.int32).reshape(-1, 32))
    d = blocks[:, :2].contiguous().view(torch.float16).reshape(q.shape[0], -1)
    assert torch.equal(d, q.scale.repeat_interleave(2, dim=1))


def test_gguf_tokenizer_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tok, model = byte_bpe(), tiny_llama()
    model.resize_token_embeddings(320, mean_resizing=False)
    x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    quantized({"rtn": {"bits": 4, "group_size": 32, "symmetric": True}}, model, x)
    path = export_gguf(model, tmp_path / "m.gguf", tok).path
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "the lazy fox says hello, world!  </s>"
    assert back(text).input_ids == tok(text).input_ids and back.eos_token == "</s>"
    torch.testing.assert_close(logits(_load_gguf(path), x), logits(model, x), rtol=0, atol=1e-5)


def test_gguf_refuses_or_requantizes_grids_without_a_ggml_type(tmp_path):
    import gguf

    model, x = quantized({"rtn": {"bits": 8, "group_size": 32, "symmetric": False}}), windows()
    with pytest.raises(ValueError, match="asymmetric 8-bit has no exact GGML type.*allow_requant"):
        export_gguf(model, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())
    path = export_gguf(model, tmp_path / "m.gguf", allow_requant=True).path
    reader = gguf.GGUFReader(path)  # re-quantized to the nearest width gguf.quants writes: Q8_0
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.")} == {"Q8_0", "F32"}
    requant = json.loads(bytes(reader.fields["lmcompose.requantized"].parts[-1]).decode())
    assert len(requant) == 14
    # a second rounding (Q8_0's own d per 32 columns): close, not exact (the exact check of the re-quantized
    # values is test_export_compositions.py::test_gguf_requantizes_act_order_to_the_nearest_type)
    torch.testing.assert_close(logits(_load_gguf(path), x), logits(model, x), rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="llama architecture only"):
        export_gguf(quantized({"rtn": {"bits": 4, "group_size": 32}}, tiny_gemma3()), tmp_path / "g.gguf")
    with pytest.raises(ValueError, match="byte-level BPE"):
        export_gguf(quantized({"rtn": {"bits": 4, "group_size": 32}}), tmp_path / "t.gguf", word_level())


def word_level():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))


# -- command line ----------------------------------------------------------------------------------------
def test_cli_exports_a_saved_run(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    model.resize_token_embeddings(320, mean_resizing=False)
    x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    quantized({"gptq": {"bits": 4, "group_size": 32, "symmetric": True}}, model, x)
    run = save_compressed(model, tmp_path / "run", byte_bpe())
    parser = build_parser()
    for fmt, out in (("dense", "dense"), ("compressed-tensors", "ct"), ("gguf", "m.gguf")):
        args = parser.parse_args(["export", str(run), "--format", fmt, "--out", str(tmp_path / out)])
        assert args.func(args) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(dense, x), logits(model, x), rtol=0, atol=1e-3)
    assert (tmp_path / "ct" / "tokenizer.json").is_file() and (tmp_path / "m.gguf").stat().st_size > 0
    args = parser.parse_args(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")])
    with pytest.raises(FileExistsError):
        args.func(args)
