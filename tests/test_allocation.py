"""Sensitivity allocation: one step's bytes spread over Linears by measured layer error, same budget."""

import copy
import itertools
import random

import pytest
from helpers import MODELS, windows

from lmcompose import Recipe, compress
from lmcompose.core.errors import IllegalStep
from lmcompose.techniques.allocation import solve_allocation


def _value(options, choice):
    return sum(options[l][k][1] for l, k in enumerate(choice)), sum(options[l][k][0] for l, k in enumerate(choice))


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_fits_and_is_near_the_exhaustive_optimum(seed):
    rng = random.Random(seed)
    options = []
    for _ in range(6):  # decreasing error with more bytes, as compression curves are
        costs = sorted(rng.sample(range(10, 100), 4))
        errs = sorted((rng.random() for _ in costs), reverse=True)
        options.append(list(zip(costs, errs)))
    budget = sum(o[1][0] for o in options)  # what "the second option everywhere" costs
    value, cost = _value(options, solve_allocation(options, budget))
    assert cost <= budget
    best = min(v for v, c in (_value(options, ch) for ch in itertools.product(range(4), repeat=6)) if c <= budget)
    assert value <= _value(options, [1] * 6)[0] + 1e-12  # never worse than the uniform choice
    assert value <= best * 1.10 + 1e-12  # Lagrangian + greedy fill: within 10% of the optimum here


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="cheapest options cost 20"):
        solve_allocation([[(10, 1.0), (20, 0.5)], [(10, 1.0)]], budget=15)


@pytest.mark.parametrize("family", list(MODELS))
@pytest.mark.parametrize("step", [{"gptq": {"ratio": 0.2, "group_size": 32}}, {"svdllm": {"ratio": 0.6}},
                                  {"wanda": {"ratio": 0.6}}])
def test_sensitivity_meets_the_budget_and_lowers_the_proxy(family, step):
    (name, params), = step.items()
    model = MODELS[family]()
    errors, ratios = {}, {}
    for alloc in ("uniform", "sensitivity"):
        recipe = Recipe.from_dict({"calibration": {"batch_size": 2},
                                   "steps": [{name: {**params, "allocation": alloc}}]})
        report = compress(copy.deepcopy(model), recipe, windows(n=8), compute_dtype="fp32")
        weights = sum(l.shape[0] * l.shape[1] for l in report.layers)
        errors[alloc] = sum(l.rel_error * l.shape[0] * l.shape[1] for l in report.layers) / weights
        ratios[alloc] = report.ratio
        if alloc == "sensitivity":
            assert len({l.bits_per_weight for l in report.layers}) > 1  # it really is non-uniform
    assert ratios["sensitivity"] <= params["ratio"] + 1e-9
    # measured on the dense inputs, applied sequentially: allow a little slack, never a loss of more
    assert errors["sensitivity"] <= errors["uniform"] * 1.02


def test_sensitivity_needs_a_ratio_and_a_dense_input():
    with pytest.raises(ValueError, match=r"steps\[0\].gptq: .*allocation=.sensitivity. spreads a `ratio` budget"):
        Recipe.from_dict({"steps": [{"gptq": {"bits": 4, "allocation": "sensitivity"}}]})
    second = Recipe.from_dict({"steps": [{"wanda": {"sparsity": 0.5}},
                                         {"gptq": {"ratio": 0.2, "allocation": "sensitivity", "target": "sparse"}}]})
    with pytest.raises(IllegalStep, match="must be the first step on a Linear"):
        second.check({"l": (64, 64)})
