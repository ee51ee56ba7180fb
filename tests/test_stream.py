"""Streaming compression (models/stream.py): a base checkpoint read block by block and a compressed one
written shard by shard equal an in-memory run bit for bit, load and evaluate, and hold one block at a time."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import Stop, logits, stop_after, tiny_llama, windows
from lmcompose import Recipe, compress
from lmcompose.models.checkpoint import SHARD_INDEX, load_compressed, save_compressed, save_streamed
from lmcompose.models.stream import open_streamed
from lmcompose.pipeline.resume import work_dir_for
from lmcompose.runtime.linear import CompressedLinear

RECIPE = Recipe.from_dict({"calibration": {"batch_size": 2},
                           "steps": [{"wanda": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 32}}]})


def _base(tmp_path, layers=3, shard="60KB"):
    base = tmp_path / f"base{layers}"
    tiny_llama(layers=layers).save_pretrained(base, max_shard_size=shard)
    return base


def _sums(out):
    return json.loads((out / "lmcompose.json").read_text())["checksums"]["tensors"]


def _streamed(base, out, recipe=RECIPE, **kw):
    model, tok, blocks = open_streamed(str(base))
    report = compress(model, recipe, windows(), work_dir=work_dir_for(out), block_io=blocks, **kw)
    save_streamed(model, out, tok, work_dir=work_dir_for(out), float_dtype=recipe.float_dtype, report=report.to_dict())
    return model, report


def test_streamed_equals_in_memory(tmp_path):
    base = _base(tmp_path)
    assert (base / SHARD_INDEX).is_file()  # the base checkpoint is itself sharded
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_safetensors=True).eval()  # as load_model
    report = compress(model, RECIPE, windows())
    save_compressed(model, tmp_path / "mem", float_dtype=RECIPE.float_dtype)
    _, streamed = _streamed(base, tmp_path / "stream")
    assert _sums(tmp_path / "stream") == _sums(tmp_path / "mem")
    assert streamed.total_bytes == report.total_bytes and streamed.linear_bytes == report.linear_bytes
    index = json.loads((tmp_path / "stream" / SHARD_INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 4  # one shard per block, one for the rest
    a, _, _ = load_compressed(tmp_path / "mem")
    b, _, _ = load_compressed(tmp_path / "stream")  # sharded: read through the index, checksums verified
    x = windows(2, 16, seed=3)
    assert torch.equal(logits(a, x), logits(b, x))


def test_streamed_run_resumes(tmp_path):
    base = _base(tmp_path)
    _streamed(base, tmp_path / "full")
    with pytest.raises(Stop):
        _streamed(base, tmp_path / "cut", on_block=stop_after(2))
    _streamed(base, tmp_path / "cut", resume=True)
    assert _sums(tmp_path / "cut") == _sums(tmp_path / "full")


def _held_bytes(model) -> int:
    """Bytes of the model's tensors that are really in memory (not on the meta device)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.device.type != "meta")
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            total += sum(t.numel() * t.element_size() for t in m.state("x").values()
                         if t.device.type != "meta") if m._probe.device.type != "meta" else 0
    return total


def test_streamed_memory_does_not_grow_with_blocks(tmp_path):
    peaks = {}
    for layers in (2, 8):
        base = _base(tmp_path, layers, shard="10GB")
        model, _, blocks = open_streamed(str(base))
        seen = []
        load = blocks.load

        def load_and_measure(i, block, prefix, load=load, model=model, seen=seen):
            load(i, block, prefix)
            seen.append(_held_bytes(model))
        blocks.load = load_and_measure
        compress(model, RECIPE, windows(), work_dir=work_dir_for(tmp_path / f"o{layers}"), block_io=blocks,
                 on_block=lambda d, t, model=model, seen=seen: seen.append(_held_bytes(model)))
        peaks[layers] = max(seen)
    assert peaks[8] == peaks[2], peaks


def test_streaming_refuses_whole_model_steps(tmp_path):
    base = _base(tmp_path)
    model, _, blocks = open_streamed(str(base))
    recipe = Recipe.from_dict({"steps": [{"rtn": {"bits": 4, "group_size": 32}}], "schedule": "step-major"})
    with pytest.raises(ValueError, match="step-major"):
        compress(model, recipe, windows(), work_dir=tmp_path / "w", block_io=blocks)


def test_cli_stream_equals_in_memory_and_resume_is_checked(setup, tmp_path, capsys):
    from lmcompose.cli import main
    from lmcompose.pipeline.resume import JOURNAL_FILE

    _, model_dir, data, recipe = setup
    common = ["compress", "--model", str(model_dir), "--recipe", str(recipe), "--data-dir", str(data),
              "--eval", "none"]
    assert main([*common, "--out", str(tmp_path / "mem")]) == 0
    assert main([*common, "--out", str(tmp_path / "st"), "--stream"]) == 0
    assert _sums(tmp_path / "st") == _sums(tmp_path / "mem")
    assert not work_dir_for(tmp_path / "st").exists()  # removed once the checkpoint is saved
    work = work_dir_for(tmp_path / "cut")
    work.mkdir()
    (work / JOURNAL_FILE).write_text(json.dumps({"format": 1, "done": 1, "fingerprint": {"blocks": 2}}))
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "cut")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 2  # another run's work directory
    assert "recipe_hash" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "cut"), "--overwrite"]) == 0  # discards it


def test_random_checkpoint_script_writes_a_sharded_model(tmp_path, tiny_tokenizer):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "make_random_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_random_checkpoint", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "random"
    assert script.main(["--out", str(out), "--blocks", "3", "--hidden", "64", "--intermediate", "128", "--heads", "4",
                        "--vocab", "128", "--tokenizer", str(tmp_path / "tok")]) == 0
    index = json.loads((out / SHARD_INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 4
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)  # transformers reads the index
    model, tok, blocks = open_streamed(str(out), dtype="fp16")
    assert tok is not None and len(hf.model.layers) == 3
    blocks.load(1, model.model.layers[1], "model.layers.1")
    for name, t in model.model.layers[1].state_dict().items():
        assert torch.equal(t, hf.model.layers[1].state_dict()[name]), name
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)


def test_cli_streamed_run_has_a_card_and_reports_as_in_memory(setup, tmp_path):
    """A sharded (--stream) run gets its model card, and `lmcompose report` reads its shards: the same bytes, by
    category, as the in-memory run of the same recipe."""
    from lmcompose.cli import main
    from lmcompose.models.checkpoint import file_tensor_bytes
    from lmcompose.reporting.card import CARD_FILE
    from lmcompose.reporting.runs import load_run

    _, model_dir, data, recipe = setup
    common = ["compress", "--model", str(model_dir), "--recipe", str(recipe), "--data-dir", str(data),
              "--eval", "none"]
    mem, st = tmp_path / "mem", tmp_path / "st"
    assert main([*common, "--out", str(mem)]) == 0
    assert main([*common, "--out", str(st), "--stream"]) == 0
    assert not (st / "model.safetensors").exists() and (st / SHARD_INDEX).is_file()
    card = (st / CARD_FILE).read_text()
    assert f"shards listed in `{SHARD_INDEX}`" in card and "Per-Linear results" in card
    total = json.loads((mem / "report.json").read_text())["total_bytes"]
    assert file_tensor_bytes(st) == file_tensor_bytes(mem) == file_tensor_bytes(mem / "model.safetensors") == total
    assert file_tensor_bytes(st / SHARD_INDEX) == total  # the index file names the same shards
    a, b = load_run(mem), load_run(st)
    assert b.bytes_by_category == a.bytes_by_category and b.file_bytes == b.total_bytes == total and b.bytes_match
    rows = {}
    for run in (mem, st):
        assert main(["report", str(run), "--out", str(tmp_path / f"{run.name}-report")]) == 0
        md = (tmp_path / f"{run.name}-report" / "report.md").read_text()
        breakdown = md.split("## Bytes by term type")[1].split("\n## ")[0]
        (rows[run.name],) = [line.split("|")[2:] for line in breakdown.splitlines() if line.startswith(f"| {run.name} |")]
        assert "1 run ·" in (tmp_path / f"{run.name}-report" / "report.html").read_text()
    assert rows["st"] == rows["mem"] and rows["st"][-3:-1] == [f" {total:,} ", " yes "]  # bytes by category, sum
