"""Recipes without calibration (``calibration: {source: none}``): statistic-free steps (RTN, magnitude, plain
SVD) run with no calibration forward, give the same tensors as a calibrated run, measure their errors on the
weights, stream and resume; every other step, and recovery, is refused before anything loads."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import Stop, stop_after, tiny_llama, windows
from lmcompose import Recipe, compress
from lmcompose.cli import main
from lmcompose.models.checkpoint import save_compressed, save_streamed
from lmcompose.models.stream import open_streamed
from lmcompose.pipeline.blocks import find_blocks
from lmcompose.pipeline.resume import work_dir_for

STEPS = [{"svd": {"rank": 4, "include": ["*o_proj"]}},
         {"magnitude": {"sparsity": 0.25, "include": ["*mlp*"]}},
         {"rtn": {"bits": 4, "group_size": 16, "target": "all"}}]
FREE = Recipe.from_dict({"calibration": {"source": "none"}, "steps": STEPS})
CALIBRATED = Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": STEPS})


def _sums(out):
    return json.loads((out / "lmcompose.json").read_text())["checksums"]["tensors"]


def test_no_forward_same_tensors_weight_errors(tmp_path):
    dense = tiny_llama(layers=3)
    originals = {n: m.weight.detach().clone() for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)}
    calibrated = tiny_llama(layers=3)
    compress(calibrated, CALIBRATED, windows())
    save_compressed(calibrated, tmp_path / "calibrated", float_dtype=CALIBRATED.float_dtype)

    model = tiny_llama(layers=3)

    def refuse(*args, **kwargs):
        raise AssertionError("a calibration forward ran")
    for block in find_blocks(model)[1]:
        block.forward = refuse
    report = compress(model, FREE, None)
    save_compressed(model, tmp_path / "free", float_dtype=FREE.float_dtype)
    assert _sums(tmp_path / "free") == _sums(tmp_path / "calibrated")
    assert report.calibration["source"] == "none" and report.calibration["windows"] is None
    step_major = tiny_llama(layers=3)
    compress(step_major, Recipe.from_dict({**FREE.to_dict(), "schedule": "step-major"}), None)
    save_compressed(step_major, tmp_path / "step-major", float_dtype=FREE.float_dtype)
    assert _sums(tmp_path / "step-major") == _sums(tmp_path / "free")
    for layer in report.layers:
        w = originals[layer.name].half().double()  # the dense weight as the recipe stores floats (fp16)
        w_hat = model.get_submodule(layer.name).to_dense(torch.float32).double()
        assert layer.rel_error == pytest.approx(float((w - w_hat).pow(2).sum() / w.pow(2).sum()), rel=1e-9)


def test_streamed_run_resumes_without_calibration(tmp_path):
    base = tmp_path / "base"
    tiny_llama(layers=3).save_pretrained(base, max_shard_size="60KB")

    def run(out, **kw):
        model, tok, blocks = open_streamed(str(base))
        report = compress(model, FREE, None, work_dir=work_dir_for(out), block_io=blocks, **kw)
        save_streamed(model, out, tok, work_dir=work_dir_for(out), float_dtype=FREE.float_dtype,
                      report=report.to_dict())
    run(tmp_path / "full")
    with pytest.raises(Stop):
        run(tmp_path / "cut", on_block=stop_after(2))
    run(tmp_path / "cut", resume=True)
    assert _sums(tmp_path / "cut") == _sums(tmp_path / "full")
    memory = tiny_llama(layers=3)
    compress(memory, FREE, None)
    save_compressed(memory, tmp_path / "memory", float_dtype=FREE.float_dtype)
    assert _sums(tmp_path / "full") == _sums(tmp_path / "memory")


@pytest.mark.parametrize("data, needle", [
    ({"steps": [{"gptq": {"bits": 4}}]}, "steps[0].gptq needs calibration statistics"),
    ({"steps": [{"rtn": {"bits": 4}}, {"wanda": {"sparsity": 0.5}}]}, "steps[1].wanda needs calibration"),
    ({"steps": [{"rotate": {}}, {"rtn": {"bits": 4}}]}, "steps[0].rotate needs calibration"),
    ({"steps": [{"rtn": {"bits": 4}}, {"reconstruct": {}}]}, "steps[1].reconstruct needs calibration"),
    ({"steps": [{"rtn": {"bits": 4}}], "recover": {"steps": 2, "train": "scales"}}, "recover trains on calibration"),
])
def test_steps_that_need_statistics_are_refused(data, needle):
    with pytest.raises(ValueError) as err:
        Recipe.from_dict({"calibration": {"source": "none"}, **data})
    assert needle in str(err.value)
    if "steps[" in needle:
        assert "allowed without calibration: magnitude, rtn, svd" in str(err.value)


def test_windows_must_match_the_calibration():
    with pytest.raises(ValueError, match="windows must be None"):
        compress(tiny_llama(), FREE, windows())
    with pytest.raises(ValueError, match="calibration: {source: none}"):
        compress(tiny_llama(), CALIBRATED, None)


def test_cli_compresses_without_calibration(setup, tmp_path, capsys):
    root, model_dir, data, _ = setup
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text("steps:\n  - rtn: {bits: 4, group_size: 32}\n")
    empty = tmp_path / "no-data"
    empty.mkdir()  # no calibration file anywhere: none is read
    out = tmp_path / "out"
    assert main(["compress", "--model", str(model_dir), "--recipe", str(recipe), "--calib-source", "none",
                 "--out", str(out), "--data-dir", str(empty), "--eval", "none", "--verbose"]) == 0
    printed = capsys.readouterr().out
    assert "calibration: none" in printed and "(weights)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == "none" and report["recipe"]["calibration"]["source"] == "none"
    card = (out / "README.md").read_text()  # the model card says what the errors are
    assert "calibration: none (no calibration pass" in card and "rel. weight error" in card
    assert main(["eval", "--model", str(out), "--data-dir", str(data), "--protocol", "quick"]) == 0
    gptq = tmp_path / "gptq.yaml"
    gptq.write_text("steps:\n  - gptq: {bits: 4, group_size: 32}\n")
    assert main(["compress", "--model", str(model_dir), "--recipe", str(gptq), "--calib-source", "none",
                 "--out", str(tmp_path / "gptq"), "--eval", "none"]) == 2
    assert "steps[0].gptq needs calibration statistics" in capsys.readouterr().err
    assert not (tmp_path / "gptq").exists()
