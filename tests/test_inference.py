"""Execution paths of CompressedLinear (algebra.kernels), prepare_inference, and bench-speed."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama
from torch import nn

from lmcompose.algebra import Dense, LowRank, QuantSpec, Sparse, quantize_rtn
from lmcompose.cli import build_parser, main
from lmcompose.eval.speed import bench_model, bench_speed
from lmcompose.models.checkpoint import save_compressed
from lmcompose.pipeline.blocks import set_module
from lmcompose.runtime.inference import InferencePolicy, held_nbytes, prepare_inference
from lmcompose.runtime.kernels import dequantize_fast, path_error
from lmcompose.runtime.linear import CompressedLinear

OUT, IN = 48, 128  # out_features a multiple of 16 and in_features of 64: the int4 kernel's constraints
# Tolerances against the default forward, relative to max|y|: fp32 paths differ in summation order, and
# int8 folds the zero point into a correction ~128·s·Σx that cancels (hence 1e-4, not 1e-6); bf16 paths
# also round the kernel's scale/zero pairs and the correction to bf16.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _w(seed=0, rows=OUT, cols=IN):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _mask(density, seed=1):
    return torch.rand(OUT, IN, generator=torch.Generator().manual_seed(seed)) < density


def _terms():
    w, perm = _w(), torch.randperm(IN, generator=torch.Generator().manual_seed(3))
    q4 = quantize_rtn(w, QuantSpec(bits=4, group_size=64))
    return {
        "fp16": [Dense(w.half())],
        "rtn4_g64": [Dense(q4)],
        "rtn3_g32_sym_actorder": [Dense(quantize_rtn(w, QuantSpec(bits=3, group_size=32, symmetric=True), perm))],
        "rtn8_row": [Dense(quantize_rtn(w, QuantSpec(bits=8)))],
        "rtn4_row_asym": [Dense(quantize_rtn(w, QuantSpec(bits=4)))],
        "sparse_q4": [Sparse(q4, _mask(0.5))],
        "sparse_fp16_lowrank": [Sparse(w.half(), _mask(0.1)), LowRank(_w(4, OUT, 8).half(), _w(5, 8, IN).half(),
                                                                      _w(8, 1, 8)[0].abs().half())],
    }


def _layer(terms, dtype, bias=True):
    b = _w(6, 1, OUT)[0].half() if bias else None
    return CompressedLinear(IN, OUT, terms, b, compute_dtype=dtype)


def _valid_paths(layer):
    """Every assignment of one valid non-default path per term (plus all-default)."""
    options = [[p for p in ("dense", "lowrank", "csr", "int8", "int4", "dequant")
                if path_error(t, p, layer._probe.dtype, layer._probe.device) is None] for t in layer.terms]
    combos = [()]
    for opts in options:
        combos = [c + (p,) for c in combos for p in opts]
    return combos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(_terms()))
def test_every_path_matches_the_default_forward(name, dtype):
    x = torch.randn(3, 5, IN).to(dtype)  # 15 rows: the kernel fallback; x[:1, :1] goes through the kernel
    ref_layer = _layer(_terms()[name], dtype)
    ref, ref1 = ref_layer(x).float(), ref_layer(x[:1, :1]).float()
    truth = x.float() @ ref_layer.to_dense().T + ref_layer.bias_value.float()
    assert (ref - truth).abs().max() <= TOL[dtype] * truth.abs().max()
    combos = _valid_paths(ref_layer)
    assert len(combos) > 1
    for paths in combos:
        layer = _layer(_terms()[name], dtype).set_paths(paths, kernel_max_rows=4)
        for inp, want in ((x, ref), (x[:1, :1], ref1)):
            got = layer(inp)
            assert got.dtype == dtype and got.shape == want.shape
            err = (got.float() - want).abs().max() / want.abs().max()
            assert err <= TOL[dtype], (paths, inp.shape, float(err))


def test_int_kernels_are_used_and_agree_with_the_fallback():
    """kernel_max_rows decides kernel vs on-the-fly dequantization; both give the same numbers (fp32)."""
    x = torch.randn(6, IN)
    for terms, path in ((_terms()["rtn4_g64"], "int4"), (_terms()["rtn8_row"], "int8")):
        kernel = _layer(terms, torch.float32).set_paths([path], kernel_max_rows=64)
        fallback = _layer(terms, torch.float32).set_paths([path], kernel_max_rows=0)
        torch.testing.assert_close(kernel(x), fallback(x), rtol=1e-5, atol=1e-5)
        assert kernel.mode == path and kernel.cached_nbytes() < 2 * OUT * IN  # int8/int4 codes, no float copy


def test_fast_dequantize_is_bitwise_the_reference():
    for spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=3, group_size=64, symmetric=True),
                 QuantSpec(bits=8)):
        q = quantize_rtn(_w(7), spec)
        assert torch.equal(dequantize_fast(q, torch.float32), q.dequantize(torch.float32))


def test_path_errors_name_the_constraint():
    t = _terms()
    cases = [(t["rtn8_row"][0], "int4", "bits <= 4"), (t["rtn4_g64"][0], "int8", "one scale per row"),
             (t["fp16"][0], "int4", "quantized"), (t["fp16"][0], "lowrank", "LowRank"),
             (t["sparse_q4"][0], "nonsense", "allowed")]
    for term, path, words in cases:
        assert words in path_error(term, path, torch.float32, torch.device("cpu"))
    assert "CSR" in path_error(t["sparse_q4"][0], "csr", torch.bfloat16, torch.device("cpu"))
    odd = Dense(quantize_rtn(_w(0, 40, IN), QuantSpec(bits=4, group_size=64)))
    assert "divisible by 16" in path_error(odd, "int4", torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="entries"):
        _layer(t["fp16"], torch.float32).set_paths(["dense", "dense"])
    with pytest.raises(ValueError, match="bits <= 4"):
        _layer(t["rtn8_row"], torch.float32).set_paths(["int4"])


def test_cast_drops_paths_the_new_dtype_cannot_run():
    layer = _layer(_terms()["sparse_fp16_lowrank"], torch.float32).set_paths(["csr", "lowrank"])
    assert layer.mode == "csr+lowrank"
    layer.to(torch.bfloat16)
    assert layer.paths == ("dense", "lowrank")
    assert layer(torch.randn(2, IN, dtype=torch.bfloat16)).dtype == torch.bfloat16


def _compressed_tiny(kind: str):
    """tiny_llama with every Linear of the blocks compressed in one way."""
    model = tiny_llama()
    for name, mod in list(model.model.layers.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        w = mod.weight.detach()
        if kind == "rtn4":
            terms = [Dense(quantize_rtn(w, QuantSpec(bits=4, group_size=32)))]
        elif kind == "sparse10":
            terms = [Sparse(w.half(), torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.1)]
        elif kind == "sparse50":
            terms = [Sparse(w.half(), torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.5)]
        else:  # rank 4: fewer flops than the product for every shape here
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            terms = [LowRank(u[:, :4].half(), vh[:4].half(), s[:4].half())]
        set_module(model.model.layers, name, CompressedLinear(mod.in_features, mod.out_features, terms))
    return model


@pytest.mark.parametrize("kind,dtype,expected", [
    ("rtn4", torch.bfloat16, "int4"), ("rtn4", torch.float32, "dense"), ("sparse10", torch.float32, "csr"),
    ("sparse50", torch.float32, "dense"), ("sparse10", torch.bfloat16, "dense"), ("lowrank", torch.float32, "lowrank")])
def test_prepare_inference_auto_choices_and_same_logits(kind, dtype, expected):
    model = _compressed_tiny(kind).to(dtype)
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=x).logits.float()
        record = prepare_inference(model, InferencePolicy(csr_max_density=0.2, kernel_max_rows=4))
        after = model(input_ids=x).logits.float()
        decode = model(input_ids=x[:1, :1]).logits.float()  # one row: the kernel itself runs
        decode_ref = _compressed_tiny(kind).to(dtype)(input_ids=x[:1, :1]).logits.float()
    assert set(record.values()) == {expected}
    assert (after - before).abs().max() <= TOL[dtype] * 10 * before.abs().max()
    assert (decode - decode_ref).abs().max() <= TOL[dtype] * 10 * decode_ref.abs().max()


def test_dequant_policy_holds_no_float_copy_and_dense_holds_one():
    x = torch.randint(0, 128, (1, 8))
    sizes = {}
    for quant in ("dense", "dequant", "kernel"):
        model = _compressed_tiny("rtn4")
        prepare_inference(model, InferencePolicy(quant=quant))
        with torch.no_grad():
            model(input_ids=x)
        sizes[quant] = held_nbytes(model)
    n_weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, CompressedLinear))
    assert sizes["dense"]["cached"] == 4 * n_weights  # one fp32 copy
    assert sizes["dequant"]["cached"] == 0
    assert 0 < sizes["kernel"]["cached"] < n_weights  # packed int4 + scale/zero pairs
    assert sizes["dense"]["terms"] == sizes["dequant"]["terms"]


def test_bench_model_reports_throughput():
    result = bench_model(_compressed_tiny("rtn4"), prompt_len=8, new_tokens=3, batch_sizes=(1, 2), repeats=1)
    assert set(result["prefill_tok_s"]) == {"1", "2"} and all(v > 0 for v in result["prefill_tok_s"].values())
    assert result["decode_tok_s"] > 0


def test_bench_speed_command_writes_json(setup, tmp_path, capsys):
    from transformers import AutoTokenizer

    _, dense_dir, _, _ = setup  # tiny_llama() with a word-level tokenizer
    ckpt = tmp_path / "ckpt"
    save_compressed(_compressed_tiny("rtn4"), ckpt, AutoTokenizer.from_pretrained(dense_dir), float_dtype="fp16",
                    base_model=str(dense_dir))
    parser = build_parser()
    out = tmp_path / "speed.json"
    args = parser.parse_args(["bench-speed", "--model", str(ckpt), "--prompt-len", "8", "--new-tokens", "2",
                              "--batch-sizes", "1", "2", "--repeats", "1", "--warmup", "0", "--dtype", "bf16",
                              "--policy", "auto", "dequant", "--no-isolate", "--json", str(out)])
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert [r["label"] for r in data["runs"]] == ["dense", "compressed/auto", "compressed/dequant"]
    assert data["runs"][1]["paths"] == {"int4": 14} and data["runs"][2]["paths"] == {"dequant": 14}
    assert data["runs"][0]["speedup_vs_dense"]["decode"] == 1.0
    assert data["config"]["dense"] == str(dense_dir) and data["environment"]["csr_measurement"]["dense_us"] > 0
    assert "bench-speed" in capsys.readouterr().out
    # a bad number is refused by the argument parser (before anything runs), and by the library
    assert main(["bench-speed", "--model", str(ckpt), "--prompt-len", "0", "--no-isolate"]) == 2
    assert "argument --prompt-len: got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="prompt_len"):
        bench_speed(str(ckpt), prompt_len=0, isolate=False)
