"""Recovery: the LM-loss fine-tune of the float factors lowers the loss and touches nothing else."""

import copy

import pytest
import torch
from helpers import MODELS, logits, windows

from lmcompose import Recipe, compress
from lmcompose.core.errors import IllegalStep
from lmcompose.models.checkpoint import (
    file_tensor_bytes,
    load_compressed,
    save_compressed,
)
from lmcompose.pipeline.blocks import compressed_modules
from lmcompose.recipe import Recovery
from lmcompose.training.recover import recover

# SSLC leaves S + L; quantizing only S leaves float factors to train next to 4-bit sparse values.
STEPS = [{"sslc": {"ratio": 0.5, "iterations": 5}}, {"rtn": {"bits": 4, "group_size": 16, "target": "sparse"}}]


@torch.no_grad()
def lm_loss(model, x):
    return float(model(input_ids=x, labels=x, use_cache=False).loss)


def stored(model):
    """Every stored tensor of every compressed Linear (codes and scales of quantized ones, masks)."""
    return {n: m.state(n) for n, m in compressed_modules(model).items()}


@pytest.mark.parametrize("arch", list(MODELS))
def test_recovery_lowers_the_loss_and_keeps_masks_codes_and_bytes(arch, tmp_path):
    model, x = MODELS[arch](), windows(8, 32)
    compress(model, Recipe.from_dict({"steps": STEPS}), x, compute_dtype="fp32")
    tuned = copy.deepcopy(model)
    info = recover(tuned, x, Recovery(steps=30, lr=1e-2, batch_size=4))
    assert lm_loss(tuned, x) < lm_loss(model, x) - 0.05
    assert info["trained_linears"] == len(compressed_modules(model))
    before, after = stored(model), stored(tuned)
    for name, tensors in before.items():
        assert tensors.keys() == after[name].keys()
        for key, t in tensors.items():
            same = torch.equal(t, after[name][key])
            # only the float factors change; quantized values (codes, scales) and the index stay bit-exact
            assert same != (".u" in key[-2:] or ".v" in key[-2:]), key
    for m, t in zip(compressed_modules(model).values(), compressed_modules(tuned).values()):
        assert m.spec() == t.spec()
        assert torch.equal(m.terms[0].mask, t.terms[0].mask)
    out = save_compressed(tuned, tmp_path / "ck")
    for name, m in compressed_modules(model).items():  # the bytes planned before recovery are the bytes saved
        assert file_tensor_bytes(out / "model.safetensors", prefix=name + ".") == m.nbytes()
    again, _, _ = load_compressed(out)
    assert torch.equal(logits(again, x), logits(tuned, x))


def test_training_sparse_values_keeps_pruned_entries_exactly_zero():
    model, x = MODELS["llama"](), windows(8, 32)
    compress(model, Recipe.from_dict({"steps": [STEPS[0]]}), x, compute_dtype="fp32")
    tuned = copy.deepcopy(model)
    info = recover(tuned, x, Recovery(steps=10, lr=1e-2, batch_size=4, train="lowrank+sparse"))
    assert info["trained_parameters"] == sum(int(m.terms[0].mask.sum()) + m.terms[1].u.numel() + m.terms[1].v.numel()
                                             for m in compressed_modules(model).values())
    for m, t in zip(compressed_modules(model).values(), compressed_modules(tuned).values()):
        sparse, new = m.terms[0], t.terms[0]
        assert torch.equal(sparse.mask, new.mask)
        assert not torch.equal(sparse.values, new.values)
        assert torch.count_nonzero(new.values[~new.mask]) == 0
        assert new.values.dtype == sparse.values.dtype and t.terms[1].u.dtype == m.terms[1].u.dtype


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_compress_runs_the_recipes_recovery_and_reports_it(dtype):
    model, x = MODELS["llama"](), windows(8, 32)
    recipe = Recipe.from_dict({"steps": [{"sslc": {"ratio": 0.6, "iterations": 5}}],
                               "recover": {"steps": 20, "lr": 1e-2, "batch_size": 4}})
    report = compress(model, recipe, x, compute_dtype=dtype)
    rec = report.to_dict()["recovery"]
    assert rec["steps"] == 20 and rec["loss_after"] < rec["loss_before"] - 0.05
    params = {n: m for n, m in compressed_modules(model).items()}
    assert rec["trained_parameters"] == sum(m.terms[1].u.numel() + m.terms[1].v.numel() for m in params.values())
    assert report.to_dict()["recipe"]["recover"]["lr"] == 1e-2


def test_recipe_without_recovery_keeps_its_form_and_with_it_round_trips():
    plain = Recipe.from_dict({"steps": STEPS})
    assert "recover" not in plain.to_dict()
    assert Recipe.from_dict({"steps": STEPS, "recover": {"steps": 0}}).hash() == plain.hash()
    tuned = Recipe.from_dict({"steps": STEPS, "recover": {"steps": 50, "train": "lowrank+sparse"}})
    assert Recipe.from_yaml(tuned.to_yaml()) == tuned and tuned.hash() != plain.hash()


@pytest.mark.parametrize("steps, train", [
    ([{"gptq": {"bits": 4}}], "lowrank"),                                       # no low-rank term at all
    ([STEPS[0], {"rtn": {"bits": 4, "target": "all"}}], "lowrank+sparse"),      # every term quantized
    ([{"wanda": {"sparsity": 0.5}}], "lowrank"),                                # sparse only, not trained
])
def test_recovery_with_nothing_to_train_is_refused_before_any_work(steps, train):
    recipe = Recipe.from_dict({"steps": steps, "recover": {"steps": 10, "train": train}})
    with pytest.raises(IllegalStep, match=r"recover: train=.* finds no float tensor to train"):
        recipe.check({"model.layers.0.mlp.up_proj": (32, 16)})


@pytest.mark.parametrize("recover, match", [
    ({"lr": -1.0}, r"recover\.lr: got -1\.0"),
    ({"steps": 5, "epochs": 2}, r"recover\.epochs: got 2: unknown key"),
    ({"train": "all"}, r"recover\.train: got 'all'"),
])
def test_bad_recovery_settings_name_the_field(recover, match):
    with pytest.raises(ValueError, match=match):
        Recipe.from_dict({"steps": STEPS, "recover": recover})
