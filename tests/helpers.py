"""Tiny models and shared assertions for the test suite (no downloads)."""

from __future__ import annotations

import importlib.util

import torch


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def tiny_gemma3(seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           max_position_embeddings=256)
    return Gemma3ForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


def windows(n: int = 4, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x, use_cache=False).logits


def layer_problem(seed: int = 0, m: int = 48, n: int = 128, tokens: int = 1024, *, mix: float = 0.4,
                  outliers: int = 4, dead=(), inputs_first: bool = False, weight_dtype=torch.float32, device=None):
    """A weight [m, n] and the statistics of `tokens` correlated inputs whose first `outliers` channels are
    8x louder and whose `dead` channels are zero. ``inputs_first`` draws the inputs before the mixing
    matrix and ``weight_dtype`` is the dtype the weight is drawn in (then fp32): the files' problems differ
    in these only. ``device``: where the weight and the statistics live."""
    from lmcompose.core.stats import StatsAccumulator

    g = torch.Generator().manual_seed(seed)
    if inputs_first:
        x = torch.randn(tokens, n, generator=g)
        x = x @ (torch.eye(n) + mix * torch.randn(n, n, generator=g) / n ** 0.5)
    else:
        mixing = torch.eye(n) + mix * torch.randn(n, n, generator=g) / n ** 0.5
        x = torch.randn(tokens, n, generator=g) @ mixing
    x[:, :outliers] *= 8
    x[:, list(dead)] = 0
    acc = StatsAccumulator(n)
    acc.update(x)
    w = torch.randn(m, n, generator=g, dtype=weight_dtype).float()
    stats = acc.result()
    return (w, stats) if device is None else (w.to(device), stats.to(device))


def objective(w, w_hat, gram) -> float:
    """The layer objective tr(ΔW H ΔWᵀ) = E‖(W − Ŵ)x‖², in fp64."""
    dw = w.double() - w_hat.double()
    return float(((dw @ gram.double()) * dw).sum())


def run_technique(name: str, terms, stats, **params):
    """Plan and apply technique `name` on one CompressedLinear made of `terms`. The plan must be exactly
    what apply produces, and the stored tensors must cost exactly the planned bytes."""
    from lmcompose.runtime.linear import CompressedLinear
    from lmcompose.techniques.registry import get_technique

    cfg = get_technique(name)(**params)
    m, n = terms[0].weight().shape
    layer = CompressedLinear(n, m, terms)
    planned = cfg.plan(layer.spec())
    new, info = cfg.apply(layer, stats)
    assert new.spec() == planned, "plan() must cost exactly what apply() produces"
    stored = sum(t.numel() * t.element_size() for t in new.state("x").values())
    assert stored == new.nbytes() == planned.nbytes(), "the stored tensors must cost the planned bytes"
    return new, info


def compress_as_checked(model, steps, x=None, *, batch_size: int = 2, **kw):
    """Check a recipe of `steps` on the model's shapes, compress the model with it (on `x`, else
    `windows()`), and assert that every Linear costs exactly the bytes the check planned. `kw` go to
    `compress` (device, compute_dtype). Returns the report and the check's result."""
    from lmcompose import Recipe, compress
    from lmcompose.pipeline.blocks import linear_shapes
    from lmcompose.runtime.linear import CompressedLinear

    recipe = Recipe.from_dict({"calibration": {"batch_size": batch_size}, "steps": list(steps)})
    planned = recipe.check(linear_shapes(model))
    report = compress(model, recipe, windows() if x is None else x, **kw)
    assert report.linear_bytes == planned.linear_bytes
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert layers.keys() == set(planned.compressed)
    for name, layer in layers.items():
        assert layer.spec() == planned.specs[name] and layer.nbytes() == planned.specs[name].nbytes(), name
    return report, planned


def only_shipped_data(monkeypatch) -> None:
    """No data directory configured and no hub: only the data shipped with lmcompose can answer."""
    import pytest

    monkeypatch.delenv("LMCOMPOSE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the hub"))


class Stop(Exception):
    """Raised by `stop_after` to interrupt a run at a block boundary."""


def stop_after(blocks: int):
    """An `on_block` callback that interrupts a compression (raising `Stop`) once `blocks` blocks are done."""
    def on_block(done, total):
        if done == blocks:
            raise Stop
    return on_block
