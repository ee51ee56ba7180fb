"""The command line end to end on a tiny local model and tiny data files."""

import json
from pathlib import Path

import pytest
import torch

from lmcompose.cli import main
from lmcompose.models.checkpoint import file_tensor_bytes


def test_compress_eval_check_techniques(setup, capsys):
    root, model_dir, data, recipe = setup
    out = root / "out"
    # bf16 forced, so the cast-after-save path runs whatever this CPU's `auto` would pick
    assert main(["compress", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(out),
                 "--data-dir", str(data), "--eval", "quick", "--compute-dtype", "bf16"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["total_bytes"] == file_tensor_bytes(out / "model.safetensors")
    assert report["evaluation"]["protocol"]["name"] == "quick" and report["evaluation"]["ppl"] > 1
    assert report["evaluation"]["protocol"]["dtype"] == "bf16" and report["environment"]["compute_dtype"] == "bf16"
    saved = json.loads((out / "lmcompose.json").read_text())
    assert saved["protocol"] == report["evaluation"]["protocol"] and saved["report"]["evaluation"]["ppl"] > 1
    # the saved checkpoint, evaluated in the same dtype, gives the in-process number exactly
    assert main(["eval", "--model", str(out), "--data-dir", str(data), "--protocol", "quick", "--dtype", "bf16",
                 "--json", str(root / "e.json")]) == 0
    again = json.loads((root / "e.json").read_text())
    assert again["ppl"] == pytest.approx(report["evaluation"]["ppl"], rel=1e-6)
    # and in fp32 it differs from bf16 only in the last digits
    assert main(["eval", "--model", str(out), "--data-dir", str(data), "--protocol", "quick", "--dtype", "fp32",
                 "--json", str(root / "e32.json")]) == 0
    fp32 = json.loads((root / "e32.json").read_text())
    assert fp32["protocol"]["dtype"] == "fp32" and fp32["ppl"] == pytest.approx(again["ppl"], rel=0.02)
    assert main(["recipe", "check", str(recipe), "--model", str(model_dir)]) == 0
    assert main(["techniques"]) == 0
    printed = capsys.readouterr().out
    assert "sparsegpt" in printed and "bits_per_weight" in printed


def test_bad_input_fails_fast_and_writes_nothing(setup, capsys):
    root, model_dir, data, _ = setup
    bad = root / "bad.yaml"
    bad.write_text("steps:\n  - gptq: {bits: 11}\n")
    assert main(["compress", "--model", str(model_dir), "--recipe", str(bad), "--out", str(root / "nope"),
                 "--data-dir", str(data)]) == 2
    assert "steps[0].gptq.bits" in capsys.readouterr().err.replace("\n", "")
    assert not (root / "nope").exists()
    (root / "exists").mkdir()
    assert main(["compress", "--model", str(model_dir), "--out", str(root / "exists"), "--data-dir", str(data)]) == 2


def test_analyze_writes_tables_and_plot_and_reports_illegal_orders(setup, capsys):
    root, model_dir, data, _ = setup
    out = root / "analysis"
    assert main(["analyze", "--model", str(model_dir), "--data-dir", str(data), "--out", str(out),
                 "--a", "svd: {ratio: 0.7}", "--b", "rtn: {bits: 4, group_size: 32}",
                 "--calib-n", "4", "--calib-seqlen", "32", "--max-windows", "4"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    v = result["variants"]
    assert v["A→B"]["legal"] and not v["B→A"]["legal"] and "quantized" in v["B→A"]["reason"]
    assert v["A→B"]["bits_per_weight"] < v["A"]["bits_per_weight"]
    # the combined error of every layer is at least that of its first step, measured on the same model
    assert all(v["A→B"]["layer_errors"][n] >= 0.5 * e for n, e in v["A"]["layer_errors"].items())
    assert result["threshold_ppl"] == pytest.approx(v["A"]["ppl"] + v["B"]["ppl"] - result["dense_ppl"])
    assert (out / "analysis.png").stat().st_size > 10_000 and "Orthogonality" in (out / "analysis.md").read_text()
    assert main(["analyze", "--model", str(model_dir), "--out", str(root / "x"), "--a", "nope: {}",
                 "--b", "rtn: {bits: 4}"]) == 2
    assert not (root / "x").exists()


def test_search_without_heldout_windows_fails_before_loading(setup, capsys):
    root, model_dir, data, _ = setup
    out = root / "search-no-heldout"
    assert main(["search", "--model", str(model_dir), "--budget", "0.5", "--out", str(out), "--heldout-n", "0",
                 "--data-dir", str(data)]) == 2
    assert "--heldout-n=0" in capsys.readouterr().err.replace("\n", "")
    assert not out.exists()


def _compress_recovering(setup, name: str, step: str, recover: str) -> Path:
    """`compress` a recipe with a recover section on 4 calibration windows of 32 tokens; the run directory."""
    root, model_dir, data, _ = setup
    recipe = root / f"{name}.yaml"
    recipe.write_text(f"calibration: {{n: 4, seqlen: 32, batch_size: 2}}\nsteps:\n  - {step}\nrecover: {recover}\n")
    out = root / name
    assert main(["compress", "--model", str(model_dir), "--recipe", str(recipe), "--out", str(out),
                 "--data-dir", str(data), "--eval", "none", "--compute-dtype", "fp32"]) == 0
    return out


def test_compress_draws_the_recovery_windows_past_the_calibration_ones(setup, capsys):
    out = _compress_recovering(setup, "recover-windows", "rtn: {bits: 4, group_size: 16}",
                               "{steps: 3, lr: 0.001, batch_size: 2, train: scales, heldout: 1, windows: 6}")
    assert "(from 6 windows: the 4 calibration windows and 2 more)" in " ".join(capsys.readouterr().out.split())
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["windows"] == [4, 32] and report["recipe"]["recover"]["windows"] == 6
    assert report["recovery"]["train_windows"] == [0, 5] and report["recovery"]["heldout_windows"] == [5, 6]


def test_compress_with_recovery_plans_reports_and_saves_it(setup, capsys):
    from helpers import logits, windows

    from lmcompose.models.checkpoint import load_compressed

    out = _compress_recovering(setup, "recovered", "svdllm: {ratio: 0.6}", "{steps: 8, lr: 0.01, batch_size: 2}")
    printed = capsys.readouterr().out
    assert "then recover: 8 causal-LM steps" in printed and "recovery_loss" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["loss_after"] < report["recovery"]["loss_before"]
    assert report["recipe"]["recover"]["steps"] == 8 and report["total_bytes"] == file_tensor_bytes(
        out / "model.safetensors")
    model, _, meta = load_compressed(out)
    assert meta["recipe"]["recover"]["lr"] == 0.01
    x = windows(2, 16)
    assert torch.isfinite(logits(model, x)).all()
