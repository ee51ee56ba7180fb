"""Compute dtype: forwards in bf16 where asked, technique arithmetic and statistics in full precision."""

import pytest
import torch
from helpers import MODELS, windows

from lmcompose import Recipe, compress
from lmcompose.core import dtypes as compute
from lmcompose.techniques.quant.gptq import GPTQ


def test_resolve_names_and_auto():
    assert compute.resolve("fp32", "cpu") == "fp32" and compute.resolve("bf16", "cpu") == "bf16"
    # a model already in half precision computes in its own dtype
    assert compute.resolve("auto", "cpu", torch.bfloat16) == "bf16"
    assert compute.resolve("auto", "cpu", torch.float16) == "fp16"
    # fp32 weights: bf16 exactly when this machine measured it fast enough
    want = "bf16" if compute.bf16_speedup("cpu") >= compute.SPEEDUP_NEEDED else "fp32"
    assert compute.resolve("auto", "cpu") == want
    with pytest.raises(ValueError, match="dtype='int8' is not allowed"):
        compute.resolve("int8", "cpu")


def test_cast_for_eval_keeps_stored_terms(tiny_llama):
    from lmcompose.runtime.linear import CompressedLinear

    compress(tiny_llama, Recipe.from_dict({"calibration": {"batch_size": 2},
                                           "steps": [{"rtn": {"bits": 4, "group_size": 32}}]}),
             windows(), compute_dtype="fp32")
    layer = next(m for m in tiny_llama.modules() if isinstance(m, CompressedLinear))
    codes = layer.terms[0].a.codes.clone()
    assert compute.cast_for_eval(tiny_llama, "bf16") == "bf16"
    assert compute.model_dtype(tiny_llama) == torch.bfloat16
    assert torch.equal(layer.terms[0].a.codes, codes)


@pytest.mark.parametrize("family", list(MODELS))
def test_bf16_forwards_leave_technique_arithmetic_in_full_precision(family, monkeypatch):
    """The pipeline's forwards run under bf16 autocast, but GPTQ (matmul-heavy) must see fp32: applied
    again outside any autocast to the very statistics it received, it must give bit-identical codes."""
    seen = []
    real_apply = GPTQ.apply

    def spy(self, layer, stats):
        new, info = real_apply(self, layer, stats)
        seen.append((self, layer, stats, new))
        return new, info

    monkeypatch.setattr(GPTQ, "apply", spy)
    model, x = MODELS[family](), windows()
    report = compress(model, Recipe.from_dict({"calibration": {"batch_size": 2},
                                               "steps": [{"gptq": {"bits": 4, "group_size": 32}}]}),
                      x, compute_dtype="bf16")
    assert report.environment["compute_dtype"] == "bf16" and seen
    for step, layer, stats, new in seen:
        assert stats.gram.dtype == torch.float32
        again, _ = real_apply(step, layer, stats)
        assert torch.equal(again.terms[0].a.codes, new.terms[0].a.codes)


def test_bf16_statistics_are_close_to_fp32(tiny_llama):
    """Same recipe, forwards in bf16 vs fp32: per-layer errors agree to a few percent."""
    import copy

    r = Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": [{"wanda": {"sparsity": 0.5}}]})
    a, b = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    e32 = [l.rel_error for l in compress(a, r, windows(), compute_dtype="fp32").layers]
    e16 = [l.rel_error for l in compress(b, r, windows(), compute_dtype="bf16").layers]
    assert e32 == pytest.approx(e16, rel=0.05)
