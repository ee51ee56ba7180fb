"""Resuming an interrupted run (pipeline/resume.py): a run stopped at any block boundary and resumed saves
tensors bit-identical (sha256) to an uninterrupted run's; a work directory of other settings is refused."""

from __future__ import annotations

import json

import pytest

from helpers import tiny_llama, windows
from lmcompose import Recipe, compress
from lmcompose.models.checkpoint import save_compressed
from lmcompose.pipeline.resume import JOURNAL_FILE, check_work_dir, work_dir_for

BLOCKS = 3
RECIPES = {
    "rtn": [{"rtn": {"bits": 4, "group_size": 32}}],
    "gptq": [{"gptq": {"bits": 3, "group_size": 16, "act_order": True}}],
    "sparse+quant": [{"wanda": {"sparsity": 0.5}}, {"rtn": {"bits": 4, "group_size": 32}}],
    "reconstruct": [{"rtn": {"bits": 2, "group_size": 32}},
                    {"reconstruct": {"train": "scales", "steps": 4, "batch_size": 2, "eval_every": 4,
                                     "target_input": "dense"}}],
}


class Stop(Exception):
    pass


def _recipe(steps):
    return Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": steps})


def _tensor_sums(model, recipe, out) -> dict:
    save_compressed(model, out, float_dtype=recipe.float_dtype)
    return json.loads((out / "lmcompose.json").read_text())["checksums"]["tensors"]


def _run(tmp_path, name, recipe, stop_at=None, resume=False, x=None, compute_dtype="fp32"):
    """`compute_dtype` is explicit: `auto` is measured per process, and on a busy machine an interrupted run
    and the uninterrupted one it is compared with could measure different dtypes."""
    model = tiny_llama(layers=BLOCKS)

    def on_block(done, total):
        if stop_at is not None and done == stop_at:
            raise Stop

    x = windows() if x is None else x
    report = compress(model, recipe, x, work_dir=work_dir_for(tmp_path / "run"), resume=resume,
                      on_block=on_block, model_name="tiny", compute_dtype=compute_dtype)
    return model, report


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cache = {}

    def get(key):
        if key not in cache:
            tmp = tmp_path_factory.mktemp(f"full-{key}")
            recipe = _recipe(RECIPES[key])
            model, report = _run(tmp, key, recipe)
            cache[key] = (_tensor_sums(model, recipe, tmp / "out"), [l.to_dict() for l in report.layers])
        return cache[key]
    return get


@pytest.mark.parametrize("key", list(RECIPES))
@pytest.mark.parametrize("stop_at", range(1, BLOCKS + 1))
def test_resume_equals_uninterrupted(tmp_path, uninterrupted, key, stop_at):
    recipe = _recipe(RECIPES[key])
    with pytest.raises(Stop):
        _run(tmp_path, key, recipe, stop_at=stop_at)
    journal = json.loads((work_dir_for(tmp_path / "run") / JOURNAL_FILE).read_text())
    assert journal["done"] == stop_at
    with pytest.raises(ValueError, match="--resume"):  # not resuming: refused, naming the option
        _run(tmp_path, key, recipe)
    model, report = _run(tmp_path, key, recipe, resume=True)
    sums, layers = uninterrupted(key)
    assert _tensor_sums(model, recipe, tmp_path / "out") == sums
    strip = lambda ls: [{k: v for k, v in l.items() if k != "steps"} for l in ls]  # noqa: E731
    assert strip([l.to_dict() for l in report.layers]) == strip(layers)


def test_resume_refuses_other_settings(tmp_path):
    recipe = _recipe(RECIPES["rtn"])
    with pytest.raises(Stop):
        _run(tmp_path, "rtn", recipe, stop_at=1)
    with pytest.raises(ValueError, match="recipe_hash"):
        _run(tmp_path, "rtn", _recipe([{"rtn": {"bits": 3, "group_size": 32}}]), resume=True)
    with pytest.raises(ValueError, match="windows_sha256"):
        _run(tmp_path, "rtn", recipe, resume=True, x=windows(seed=7))
    with pytest.raises(ValueError, match="--resume"):
        check_work_dir(work_dir_for(tmp_path / "run"), resume=False, overwrite=False)
    check_work_dir(work_dir_for(tmp_path / "run"), resume=False, overwrite=True)  # discarded when the run starts


def test_resume_refuses_step_major_by_name(tmp_path):
    recipe = Recipe.from_dict({"calibration": {"batch_size": 2}, "schedule": "step-major",
                               "steps": RECIPES["sparse+quant"]})
    with pytest.raises(ValueError, match="step-major"):
        _run(tmp_path, "x", recipe, resume=True)
    _run(tmp_path, "x", recipe)  # without --resume it runs, writing no work directory
    assert not work_dir_for(tmp_path / "run").exists()


def test_resume_without_a_work_dir_starts_over(tmp_path):
    recipe = _recipe(RECIPES["rtn"])
    model, _ = _run(tmp_path, "rtn", recipe, resume=True)
    assert json.loads((work_dir_for(tmp_path / "run") / JOURNAL_FILE).read_text())["done"] == BLOCKS


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from helpers import tiny_llama, windows
from lmcompose import Recipe, compress
recipe = Recipe.from_dict({recipe!r})

def on_block(done, total):
    if done == {stop}:
        os.kill(os.getpid(), signal.SIGKILL)

compress(tiny_llama(layers={blocks}), recipe, windows(), work_dir={work!r}, on_block=on_block, model_name="tiny",
         compute_dtype="fp32")
"""


def test_resume_after_sigkill(tmp_path, uninterrupted):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    recipe = _recipe(RECIPES["gptq"])
    work = str(work_dir_for(tmp_path / "run"))
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), recipe=recipe.to_dict(), stop=2, blocks=BLOCKS,
                               work=work)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    model, _ = _run(tmp_path, "gptq", recipe, resume=True)
    assert _tensor_sums(model, recipe, tmp_path / "out") == uninterrupted("gptq")[0]


def test_resumed_auto_run_keeps_the_dtype_it_started_with(tmp_path, monkeypatch):
    """`auto` is measured per process: a resumed run that measured the other dtype takes the saved one."""
    from lmcompose.core import dtypes

    def measuring(picked):
        return lambda name, device, model_dtype=None: picked if name == "auto" else name
    recipe = _recipe(RECIPES["gptq"])
    monkeypatch.setattr(dtypes, "resolve", measuring("bf16"))
    with pytest.raises(Stop):
        _run(tmp_path, "gptq", recipe, stop_at=1, compute_dtype="auto")
    monkeypatch.setattr(dtypes, "resolve", measuring("fp32"))  # the resumed process measures otherwise
    model, report = _run(tmp_path, "gptq", recipe, resume=True, compute_dtype="auto")
    assert report.environment["compute_dtype"] == "bf16"
    whole = tiny_llama(layers=BLOCKS)
    compress(whole, recipe, windows(), compute_dtype="bf16")
    assert _tensor_sums(model, recipe, tmp_path / "a") == _tensor_sums(whole, recipe, tmp_path / "b")
