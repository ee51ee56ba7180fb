"""One engine for the pipeline and the search: the same apply/check/error (`techniques.apply`), the same
dense statistics pass (`pipeline.dense_stats`), and the recipe's float dtype in the allocation."""

import copy

import pytest
import torch
from helpers import tiny_llama, windows

from lmcompose import Recipe, compress
from lmcompose.algebra import Sparse
from lmcompose.core.dtypes import FLOAT_DTYPES
from lmcompose.core.errors import InvariantError
from lmcompose.pipeline.dense_stats import DenseStats
from lmcompose.search.objective import Evaluator
from lmcompose.techniques import allocation, base
from lmcompose.techniques.registry import get_technique

CALIB, HELDOUT = windows(4, 32, seed=1), windows(2, 32, seed=7)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def evaluator(model):
    stats = DenseStats.compute(model, CALIB, batch_size=2, compute_dtype="fp32")
    return Evaluator(model, stats, CALIB, HELDOUT, compute_dtype="fp32")


def recipe(*steps, **kw):
    return Recipe.from_dict({"calibration": {"batch_size": 2}, "steps": list(steps), **kw})


def _move_the_mask(real):
    def apply(self, layer, stats):
        new, info = real(self, layer, stats)
        (term,) = new.terms
        return new.with_terms([Sparse(term.values, term.mask.roll(1, dims=1), term.n, term.m)]), info
    return apply


def _store_nothing(real):
    def apply(self, layer, stats):
        real(self, layer, stats)
        return layer, {}
    return apply


@pytest.mark.parametrize("broken, patch, what", [("rtn", _move_the_mask, "changed the mask"),
                                                 ("wanda", _store_nothing, "but planned")])
def test_a_broken_step_fails_alike_in_the_pipeline_and_the_search(model, evaluator, monkeypatch, broken, patch,
                                                                   what):
    cls = get_technique(broken)
    monkeypatch.setattr(cls, "apply", patch(cls.apply))
    r = recipe({"wanda": {"sparsity": 0.5}}, {"rtn": {"bits": 4, "group_size": 32}})
    messages = []
    for run in (lambda: compress(copy.deepcopy(model), r, CALIB, compute_dtype="fp32"),
                lambda: evaluator.proxy(r), lambda: evaluator.independent(r)):
        with pytest.raises(InvariantError, match=what) as caught:
            run()
        messages.append(str(caught.value))
    assert messages[0].startswith(f"model.layers.0.self_attn.q_proj: step {broken!r}")
    assert messages == [messages[0]] * 3


def _record_moves(model, log):
    for i, block in enumerate(model.model.layers):
        real = block.to

        def to(device, _real=real, _i=i):
            log.append((_i, torch.device(device).type))
            return _real(device)
        block.to = to


def test_dense_statistics_visit_the_device_one_block_at_a_time_and_stay_on_the_cpu(model):
    in_place = DenseStats.compute(model, CALIB, batch_size=2, compute_dtype="fp32")
    moved, log = copy.deepcopy(model), []
    _record_moves(moved, log)
    offloaded = DenseStats.compute(moved, CALIB, batch_size=2, compute_dtype="fp32", device="cpu")
    assert log == [(i, "cpu") for i in (0, 0, 1, 1)]  # there and back, block after block
    _same_stats(offloaded, in_place)
    assert all(s.gram.device.type == "cpu" for s in offloaded.stats.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_dense_statistics_with_blocks_offloaded_equal_those_in_place(model):
    on_device = DenseStats.compute(copy.deepcopy(model).cuda(), CALIB, batch_size=2, compute_dtype="fp32")
    offloaded = DenseStats.compute(copy.deepcopy(model), CALIB, batch_size=2, compute_dtype="fp32", device="cuda")
    _same_stats(offloaded, on_device)
    assert all(s.gram.device.type == "cpu" for s in offloaded.stats.values())


def _same_stats(a, b):
    assert a.alias == b.alias and a.blocks == b.blocks and a.key == b.key
    for name in a.alias:
        x, y = a[name], b[name]
        assert x.n_tokens == y.n_tokens
        assert torch.equal(x.gram, y.gram) and torch.equal(x.abs_mean, y.abs_mean) and torch.equal(x.absmax, y.absmax)


@pytest.mark.parametrize("step", [{"gptq": {"ratio": 0.2, "group_size": 32, "allocation": "sensitivity"}},
                                  {"wanda": {"sparsity": 0.5, "owl": True}}])
def test_the_pipeline_prepass_and_the_proxy_allocate_from_the_same_statistics(model, evaluator, monkeypatch, step):
    (name, _), = step.items()
    cls = get_technique(name)
    calls, real = [], cls.allocate

    def spy(self, blocks, *, float_dtype):
        chosen = real(self, blocks, float_dtype=float_dtype)
        calls.append((blocks, chosen))
        return chosen

    monkeypatch.setattr(cls, "allocate", spy)
    r = recipe(step)
    compress(copy.deepcopy(model), r, CALIB, compute_dtype="fp32")
    evaluator.proxy(r)
    (pipeline_blocks, pipeline_chosen), (proxy_blocks, proxy_chosen) = calls
    assert pipeline_chosen == proxy_chosen and len(set(map(repr, pipeline_chosen.values()))) > 1
    assert [[n for n, _, _ in b] for b in pipeline_blocks] == [[n for n, _, _ in b] for b in proxy_blocks]
    for a, b in zip(sum(pipeline_blocks, []), sum(proxy_blocks, [])):
        assert torch.equal(a[1], b[1])
        assert torch.equal(a[2].gram, b[2].gram) and torch.equal(a[2].abs_mean, b[2].abs_mean)
        assert torch.equal(a[2].gram, evaluator.stats[a[0]].gram)


@pytest.mark.parametrize("float_dtype", ["fp16", "bf16", "fp32"])
def test_allocation_measures_candidates_in_the_recipe_float_dtype(model, monkeypatch, float_dtype):
    measured, chosen = [], {}
    real_apply, real_allocate = allocation.apply_steps, allocation.allocate_by_sensitivity

    def apply_spy(layer, steps, stats, name="", original=None):
        out = real_apply(layer, steps, stats, name, original)
        measured.append((name, steps[0], layer.terms[0].a.dtype, out[1][0]))
        return out

    def allocate_spy(step, blocks, float_dtype):
        chosen.update(real_allocate(step, blocks, float_dtype))
        return chosen

    monkeypatch.setattr(allocation, "apply_steps", apply_spy)
    monkeypatch.setattr(base, "allocate_by_sensitivity", allocate_spy)
    r = recipe({"svdllm": {"ratio": 0.6, "allocation": "sensitivity"}}, float_dtype=float_dtype)
    report = compress(copy.deepcopy(model), r, CALIB, compute_dtype="fp32")
    assert {dtype for _, _, dtype, _ in measured} == {FLOAT_DTYPES[float_dtype]}
    assert report.ratio <= 0.6 + 1e-9 and len({l.nbytes for l in report.layers}) > 2
    for layer in report.layers:  # the allocation measured what the pipeline then stored
        (result,) = [res for n, step, _, res in measured if n == layer.name and step == chosen[layer.name]]
        assert result.layer.spec().nbytes() == layer.nbytes and result.layer.spec().describe() == layer.structure
        if float_dtype == "fp32" and ".layers.0." in layer.name:  # dense inputs, nothing rounded: same error
            assert result.rel_error == layer.rel_error
