"""Resuming a run killed during its recovery (training/recover.py checkpoints, pipeline/resume.py): the
tensors saved at the end and the losses reported are bit-identical to an uninterrupted run's, whether the
kill came between two checkpoints, right after one or after the last step; other settings are refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import tiny_llama, windows
from lmcompose import Recipe, compress
from lmcompose.models.checkpoint import save_compressed
from lmcompose.pipeline.resume import RECOVER_FILE, work_dir_for
from lmcompose.recipe import Recovery
from lmcompose.training import recover as recover_module

SSLC = [{"sslc": {"ratio": 0.5, "iterations": 5}}, {"rtn": {"bits": 4, "group_size": 16, "target": "sparse"}}]
CASES = {  # float factors and scales on the LM loss; scales on the KL to a cached dense teacher
    "lm": (SSLC, {"lr": 1e-2, "train": "lowrank+scales"}),
    "kl": ([{"rtn": {"bits": 4, "group_size": 16}}], {"lr": 1e-4, "train": "scales", "loss": "kl", "top_k": 16}),
}
STEPS, EVERY = 5, 2  # states saved after steps 2, 4 and 5 (the last)
# where the run is killed -> the step the resumed run continues from
STOPS = {"between checkpoints": (3, 2), "right after one": (4, 4), "after the last step": ("end", 5)}
TIMING = ("seconds", "teacher_seconds", "resumed_from_step")  # what may differ in the record


class Stop(Exception):
    pass


def _recipe(case: str, **change) -> Recipe:
    steps, rec = CASES[case]
    return Recipe.from_dict({"calibration": {"batch_size": 2, "n": 6}, "steps": steps,
                             "recover": {"steps": STEPS, "batch_size": 2, "heldout": 1, "checkpoint_every": EVERY,
                                         **rec, **change}})


def _run(recipe, work=None, resume=False):
    model = tiny_llama(layers=2)
    report = compress(model, recipe, windows(6, 32), work_dir=work, resume=resume, model_name="tiny",
                      compute_dtype="fp32")
    return model, report.recovery


def _killed(monkeypatch, recipe, work, stop) -> None:
    """Run `recipe` into `work` and stop it at step `stop` of the recovery (before that step's windows are
    read), or after its last step (``"end"``: when the trained tensors are written back)."""
    with monkeypatch.context() as patch:
        if stop == "end":
            def write_back(self):
                raise Stop
            patch.setattr(recover_module._Trainable, "write_back", write_back)
        else:
            rows = recover_module._rows

            def stopping(step, batch_size, n):
                if step == stop:
                    raise Stop
                return rows(step, batch_size, n)
            patch.setattr(recover_module, "_rows", stopping)
        with pytest.raises(Stop):
            _run(recipe, work)


def _tensor_sums(model, recipe, out) -> dict:
    save_compressed(model, out, float_dtype=recipe.float_dtype)
    return json.loads((out / "lmcompose.json").read_text())["checksums"]["tensors"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(tensor sha256s, recovery record) of a run with no work directory, so no checkpoint, per case."""
    cache = {}

    def get(case):
        if case not in cache:
            recipe = _recipe(case)
            model, record = _run(recipe)
            cache[case] = _tensor_sums(model, recipe, tmp_path_factory.mktemp(case) / "out"), record
        return cache[case]
    return get


@pytest.mark.parametrize("stop", list(STOPS))
@pytest.mark.parametrize("case", list(CASES))
def test_a_recovery_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, monkeypatch, uninterrupted, case, stop):
    recipe, work = _recipe(case), work_dir_for(tmp_path / "run")
    at, continues_from = STOPS[stop]
    _killed(monkeypatch, recipe, work, at)
    assert json.loads((work / "journal.json").read_text())["done"] == 2 and (work / RECOVER_FILE).is_file()
    model, record = _run(recipe, work, resume=True)
    sums, full = uninterrupted(case)
    assert _tensor_sums(model, recipe, tmp_path / "out") == sums
    assert record["resumed_from_step"] == continues_from
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert strip(record) == strip(full)  # losses before/after, held-out ones and the loss history: equal floats
    assert {"heldout_loss_before", "heldout_loss_after", "loss_first", "loss_last"} <= set(record)


def test_a_resume_with_another_recovery_setting_is_refused_naming_it(tmp_path, monkeypatch):
    work = work_dir_for(tmp_path / "run")
    _killed(monkeypatch, _recipe("lm"), work, 3)
    with pytest.raises(ValueError, match=r"recover\.lr: saved 0\.01, now 0\.02"):
        _run(_recipe("lm", lr=2e-2), work, resume=True)
    with pytest.raises(ValueError, match=r"recover\.heldout: saved 1, now 2"):
        _run(_recipe("lm", heldout=2), work, resume=True)


def test_recover_continues_from_its_state_file_and_refuses_one_of_other_settings(tmp_path):
    """`recover` itself, without a journal: a state of other settings is refused by the file's own check;
    with ``checkpoint_every: 0`` no state is written."""
    model, x = tiny_llama(layers=2), windows(6, 32)
    compress(model, Recipe.from_dict({"calibration": {"n": 6}, "steps": SSLC}), x, compute_dtype="fp32")
    cfg = Recovery(steps=3, lr=1e-2, batch_size=2, checkpoint_every=1)
    state = tmp_path / RECOVER_FILE
    recover_module.recover(copy.deepcopy(model), x, cfg, state_file=state)
    with pytest.raises(ValueError, match=r"recover\.batch_size: saved 2, now 1"):
        recover_module.recover(copy.deepcopy(model), x, cfg.model_copy(update={"batch_size": 1}), state_file=state)
    with pytest.raises(ValueError, match="the calibration windows"):
        recover_module.recover(copy.deepcopy(model), windows(6, 32, seed=5), cfg, state_file=state)
    again = recover_module.recover(copy.deepcopy(model), x, cfg, state_file=state)  # all 3 steps saved
    assert again["resumed_from_step"] == 3
    off = tmp_path / "off.safetensors"
    recover_module.recover(copy.deepcopy(model), x, cfg.model_copy(update={"checkpoint_every": 0}), state_file=off)
    assert not off.exists()


def test_checkpoint_every_is_validated_and_kept_out_of_the_recipe_at_its_default():
    with pytest.raises(ValueError, match=r"recover\.checkpoint_every: got -1"):
        Recipe.from_dict({"steps": SSLC, "recover": {"steps": 5, "checkpoint_every": -1}})
    plain = Recipe.from_dict({"steps": SSLC, "recover": {"steps": 5}})
    assert "checkpoint_every" not in plain.to_dict()["recover"]
    assert plain.hash() == Recipe.from_dict({"steps": SSLC, "recover": {"steps": 5, "checkpoint_every": 16}}).hash()
    assert Recipe.from_dict({"steps": SSLC, "recover": {"steps": 5, "checkpoint_every": 0}}).to_dict()[
        "recover"]["checkpoint_every"] == 0
    assert torch.equal(recover_module._rows(3, 2, 5), torch.tensor([1, 2]))  # the data order: a function of the step
