"""Every technique from one table, on every device: plan and apply on a layer, and through the pipeline.

The properties of each method live in its own file (test_wanda.py, test_sparsegpt.py, test_gptq.py,
test_lowrank.py, test_sslc.py, test_dam.py, test_qer.py); this file holds what all techniques share, and
magnitude pruning, which has no file of its own.
"""

import pytest
import torch
from helpers import MODELS, compress_as_checked, layer_problem, objective, run_technique, tiny_llama, windows

from lmcompose.algebra import Dense, Sparse
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.registry import registry

# technique: (budget knob, a small budget, a larger one)
BUDGETS = {"magnitude": ("sparsity", 0.7, 0.3), "wanda": ("sparsity", 0.7, 0.3), "sparsegpt": ("sparsity", 0.7, 0.3),
           "rtn": ("bits", 2, 4), "gptq": ("bits", 2, 4), "svd": ("ratio", 0.5, 0.9), "asvd": ("ratio", 0.5, 0.9),
           "svdllm": ("ratio", 0.5, 0.9), "qer": ("rank", 1, 8), "lqer": ("rank", 1, 8), "l2qer": ("rank", 1, 8),
           "qera": ("rank", 1, 8), "sslc": ("ratio", 0.4, 0.8), "oats": ("ratio", 0.4, 0.8),
           "dam": ("ratio", 0.2, 0.4)}
NO_BUDGET = {"awq", "reconstruct", "rotate"}  # they store what they are given: their own tests (test_awq.py,
# test_reconstruct.py, test_rotate.py) cover them


def test_every_registered_technique_has_a_case():
    assert set(registry()) == set(BUDGETS) | NO_BUDGET


@pytest.mark.parametrize("technique", sorted(BUDGETS))
def test_layer_stays_on_its_device_costs_what_it_plans_and_error_falls_with_budget(technique, device):
    knob, small, large = BUDGETS[technique]
    w, stats = layer_problem(device=device)
    errors = []
    for value in (small, large):
        new, _ = run_technique(technique, [Dense(w.half())], stats, **{knob: value})  # plan == apply, bytes
        assert {t.device.type for t in new.state("x").values()} == {device.type}
        dense = new.to_dense()
        assert torch.isfinite(dense).all()
        errors.append(objective(w, dense, stats.gram))
    assert errors[1] < errors[0]


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("technique", sorted(BUDGETS))
def test_pipeline_bytes_as_planned_and_error_falls_with_budget(family, technique, device):
    knob, small, large = BUDGETS[technique]
    errors = []
    for value in (small, large):  # the model stays on the CPU, its blocks visit `device` one at a time
        report, _ = compress_as_checked(MODELS[family](), [{technique: {knob: value}}], windows(4, 16), device=device)
        errors.append(sum(l.rel_error for l in report.layers))
    assert errors[1] < errors[0]


def test_sparse_then_quantized_mask_survives_in_the_model(device):
    model = tiny_llama()
    compress_as_checked(model, [{"sparsegpt": {"pattern": "2:4"}},
                                {"gptq": {"bits": 3, "group_size": 32, "target": "sparse"}}], device=device)
    layers = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(layers) == 14
    for m in layers:
        (term,) = m.terms
        assert isinstance(term, Sparse) and (m.to_dense()[~term.mask] == 0).all()


# -- magnitude ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_magnitude_nm_keeps_the_n_largest_per_group(pattern, device):
    n, m = map(int, pattern.split(":"))
    w, stats = layer_problem(device=device)
    new, info = run_technique("magnitude", [Dense(w.half())], stats, pattern=pattern)
    mask = new.terms[0].mask
    assert mask.device.type == device.type and (mask.reshape(48, -1, m).sum(-1) == n).all()
    assert ((new.to_dense() != 0).reshape(48, -1, m).sum(-1) == n).all()
    groups = w.half().float().abs().reshape(48, -1, m)
    kept = groups.masked_fill(~mask.reshape(groups.shape), float("inf")).amin(-1)
    dropped = groups.masked_fill(mask.reshape(groups.shape), -float("inf")).amax(-1)
    assert (kept >= dropped).all() and info["sparsity"] == pytest.approx(1 - n / m)


@pytest.mark.parametrize("scope", ["row", "matrix"])
def test_magnitude_keeps_the_largest_weights_of_its_scope(scope):
    w, stats = layer_problem()
    new, info = run_technique("magnitude", [Dense(w.half())], stats, sparsity=0.6, scope=scope)
    mask, score = new.terms[0].mask, w.half().float().abs()
    if scope == "row":
        assert (mask.sum(1) == 128 - int(128 * 0.6)).all()
        kept, dropped = score.masked_fill(~mask, float("inf")), score.masked_fill(mask, -float("inf"))
        assert (kept.amin(1) >= dropped.amax(1)).all()
    else:
        assert int(mask.sum()) == mask.numel() - int(mask.numel() * 0.6)
        assert score[mask].min() >= score[~mask].max()
    assert torch.equal(new.to_dense()[mask], w.half().float()[mask]) and (new.to_dense()[~mask] == 0).all()
