"""Saving and loading: identical logits, byte counts that match the file, atomic writes."""

import json

import pytest
import torch
from helpers import MODELS, logits, windows

from lmcompose import Recipe, compress
from lmcompose.models import checkpoint
from lmcompose.models.checkpoint import (
    file_tensor_bytes,
    load_compressed,
    save_compressed,
)
from lmcompose.models.export.dense import export_dense

RECIPE = Recipe.from_dict({"calibration": {"batch_size": 2},
                           "steps": [{"magnitude": {"sparsity": 0.5}}, {"rtn": {"bits": 4, "group_size": 24}}]})


@pytest.fixture(params=list(MODELS))
def compressed(request):
    model, x = MODELS[request.param](), windows()
    report = compress(model, RECIPE, x)
    return model, x, report


def test_save_load_identical_logits_and_exact_bytes(compressed, tmp_path):
    model, x, report = compressed
    out = save_compressed(model, tmp_path / "ck", recipe=RECIPE.to_dict(), report=report.to_dict())
    assert file_tensor_bytes(out / "model.safetensors") == report.total_bytes
    for layer in report.layers:
        assert file_tensor_bytes(out / "model.safetensors", prefix=layer.name + ".") == layer.nbytes
    again, _, meta = load_compressed(out)
    assert torch.equal(logits(again, x), logits(model, x))
    assert meta["recipe"] == RECIPE.to_dict()


def test_existing_output_is_not_overwritten(compressed, tmp_path):
    model, _, _ = compressed
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_compressed(model, tmp_path / "ck")
    assert (tmp_path / "ck" / "keep.txt").read_text() == "mine"


def test_failed_save_leaves_nothing_that_looks_whole(compressed, tmp_path, monkeypatch):
    model, _, _ = compressed

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_no_pickles_in_checkpoint(compressed, tmp_path):
    model, _, _ = compressed
    out = save_compressed(model, tmp_path / "ck")
    suffixes = {p.suffix for p in out.iterdir()}
    assert suffixes <= {".safetensors", ".json"}
    json.loads((out / "lmcompose.json").read_text())


def test_dense_export_loads_with_transformers(compressed, tmp_path):
    from transformers import AutoModelForCausalLM

    model, x, _ = compressed
    out = export_dense(model, tmp_path / "dense", dtype="fp32")
    dense = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    torch.testing.assert_close(logits(dense, x), logits(model, x), rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, checkpoint.CompressedLinear) for m in model.modules())  # restored
