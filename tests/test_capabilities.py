"""Capabilities, not names: rules, invariants and the costing read what a technique declares (`trains`,
`leaves_grid`, `needs_dense_input`, `ratio_replaces`), and `Recipe.check` and `rules.explain` are one walk."""

import re
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from lmcompose import Recipe
from lmcompose.algebra import Dense, QuantSpec, quantize_rtn
from lmcompose.algebra.invariants import check_step
from lmcompose.core.errors import IllegalStep, InvariantError
from lmcompose.rules import explain
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.search.space import StepSpace
from lmcompose.techniques.base import _REGISTRY, Technique, register
from lmcompose.techniques.registry import get_technique, registry

SHAPES = {"blocks.0.q": (32, 64), "blocks.0.o": (64, 32)}
SRC = Path(__file__).resolve().parents[1] / "src" / "lmcompose"


@pytest.fixture
def toys():
    """Register toy techniques for one test, and remove them afterwards."""
    added = []

    def add(cls):
        register(cls)
        added.append(cls.name)
        return cls
    yield add
    for name in added:
        _REGISTRY.pop(name, None)


class Passthrough(Technique):
    """Stores what it was given: legal after any step, so only its capabilities matter."""

    family: ClassVar[str] = "toy"

    def plan(self, spec):
        return spec

    def apply(self, layer, stats):
        return layer, {}


def test_a_new_technique_that_trains_gets_rule_r5_without_a_name_check(toys):
    @toys
    class Trainer(Passthrough):
        name: ClassVar[str] = "toy-trainer"
        trains: ClassVar[bool] = True

    @toys
    class Idle(Passthrough):
        name: ClassVar[str] = "toy-idle"

    out = explain(Recipe(steps=[{"rtn": {"bits": 4}}, {"toy-trainer": {}}]), SHAPES)
    assert [w.rule.id for w in out[1].warnings] == ["R5"] and "toy-trainer trains" in out[1].warnings[0].message
    assert "R5" in out[1].applies
    assert not explain(Recipe(steps=[{"toy-trainer": {}}, {"rtn": {"bits": 4}}]), SHAPES)[0].warnings
    assert not explain(Recipe(steps=[{"rtn": {"bits": 4}}, {"toy-idle": {}}]), SHAPES)[1].warnings


def test_the_techniques_that_train_say_so():
    sslc, dam = get_technique("sslc"), get_technique("dam")
    assert sslc(ratio=0.5, finetune_steps=5).trains and not sslc(ratio=0.5).trains
    assert get_technique("oats")(ratio=0.5, finetune_steps=5).trains
    assert dam(rank=4).trains and not dam(rank=4, steps=0).trains and not dam(rank=4, mode="l_then_q").trains
    assert [name for name, cls in sorted(registry().items()) if _default(cls).trains] == ["dam", "reconstruct"]
    out = explain(Recipe(steps=[{"rtn": {"bits": 4}}, {"dam": {"rank": 4, "allow_offgrid": True}}]), SHAPES)
    assert "R5" in [w.rule.id for w in out[1].warnings]


def _default(cls):
    """An instance of `cls` with the fewest knobs that validates."""
    for params in ({}, {"sparsity": 0.5}, {"rank": 4}, {"ratio": 0.5}):
        try:
            return cls(**params)
        except ValueError:
            continue
    raise AssertionError(f"no default instance of {cls.__name__}")


def _quantized_layer():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    return CompressedLinear(64, 16, [Dense(quantize_rtn(w, QuantSpec(4, 32)))])


class Requantizer(Passthrough):
    """Replaces the codes of an earlier quantization (a broken quantizer, unless it says it leaves the grid)."""

    name: ClassVar[str] = "toy-requantizer"

    def apply(self, layer, stats):
        w = layer.terms[0].weight(torch.float32)
        return layer.with_terms([Dense(quantize_rtn(w * 1.5, QuantSpec(4, 32)))]), {}


def test_leaves_grid_exempts_a_step_from_the_codes_invariant():
    class OffGrid(Requantizer):
        leaves_grid: ClassVar[bool] = True

    q = _quantized_layer()
    with pytest.raises(InvariantError, match="codes"):
        check_step(q, Requantizer().apply(q, None)[0], Requantizer())
    check_step(q, OffGrid().apply(q, None)[0], OffGrid())
    svd = get_technique("svd")
    assert svd(rank=4, allow_offgrid=True).leaves_grid and not svd(rank=4).leaves_grid
    assert get_technique("dam")(rank=4, allow_offgrid=True).leaves_grid
    assert not any(_default(cls).leaves_grid for cls in registry().values())


def test_needs_dense_input_is_refused_after_another_step(toys):
    @toys
    class Measurer(Passthrough):
        name: ClassVar[str] = "toy-measurer"
        needs_dense_input: ClassVar[bool] = True
        dense_input_reason: ClassVar[str] = "toy-measurer reads the dense weights"

    Recipe(steps=[{"toy-measurer": {}}, {"rtn": {"bits": 4}}]).check(SHAPES)
    with pytest.raises(IllegalStep, match=r"^steps\[1\]\.toy-measurer on blocks\.0\.q \(.*\): toy-measurer reads the "
                                          r"dense weights, so it must be the first step on a Linear"):
        Recipe(steps=[{"rtn": {"bits": 4}}, {"toy-measurer": {}}]).check(SHAPES)
    assert get_technique("svdllm")(ratio=0.8, allocation="sensitivity").needs_dense_input
    assert not get_technique("svdllm")(ratio=0.8).needs_dense_input


def test_ratio_replaces_is_declared_by_each_technique():
    for name, cls in registry().items():
        if cls.family in ("transform", "train"):  # stores what it was given (AWQ's scales, trained values)
            assert not cls.ratio_replaces and "ratio" not in cls.model_fields, name
            continue
        assert cls.ratio_replaces and "ratio" in cls.model_fields, name
        assert set(cls.ratio_replaces) <= set(cls.model_fields) - {"ratio"}, name
        assert StepSpace(technique=name).replaced() == cls.ratio_replaces
    assert StepSpace(technique="gptq", ratio_replaces=("group_size",)).replaced() == ("group_size",)
    assert {n: registry()[n].ratio_replaces for n in ("wanda", "svdllm", "gptq", "qer", "sslc")} == {
        "wanda": ("sparsity",), "svdllm": ("rank",), "gptq": ("bits",), "qer": ("rank",), "sslc": ("rank", "sparsity")}


RECIPES = [
    [{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 32}}],
    [{"rtn": {"bits": 4}}, {"wanda": {"sparsity": 0.5}}],
    [{"svdllm": {"ratio": 0.8}}, {"gptq": {"bits": 4, "target": "lowrank", "include": ["*.q"]}}],
    [{"sslc": {"ratio": 0.6}}, {"rtn": {"bits": 8, "target": "all"}}],
    [{"qer": {"bits": 3, "rank": 4}}],
]


@pytest.mark.parametrize("steps", RECIPES)
def test_check_and_explain_are_one_walk(steps):
    recipe = Recipe(steps=steps)
    checked = recipe.check(SHAPES)
    walked = list(recipe.walk(SHAPES))
    explained = explain(recipe, SHAPES)
    assert [w.index for w in walked] == [e.index for e in explained] == list(range(len(steps)))
    for w, e in zip(walked, explained):
        assert e.name == w.step.name and e.targets == len(w.names)
        assert e.structure_in == sorted({s.describe() for s in w.before.values()})
        assert e.structure_out == sorted({s.describe() for s in w.after.values()})
    final = {n: s for w in walked for n, s in w.after.items()}
    assert all(checked.specs[n] == s for n, s in final.items())
    assert explained[-1].linear_bytes == checked.linear_bytes
    assert explained[-1].ratio_of_fp16 == pytest.approx(checked.to_dict()["ratio"])


@pytest.mark.parametrize("data", [
    {"steps": [{"rtn": {"bits": 4}}, {"svd": {"ratio": 0.5}}]},
    {"steps": [{"rtn": {"bits": 4, "include": ["nothing"]}}]},
    {"steps": [{"rtn": {"bits": 4}}, {"svdllm": {"ratio": 0.8, "allocation": "sensitivity"}}]},
    {"steps": [{"svdllm": {"ratio": 0.8}}, {"gptq": {"bits": 4}}], "recover": {"steps": 10}},
])
def test_check_and_explain_refuse_the_same_recipes_with_the_same_words(data):
    recipe = Recipe.from_dict(data)
    with pytest.raises(IllegalStep) as checked:
        recipe.check(SHAPES)
    with pytest.raises(IllegalStep) as explained:
        explain(recipe, SHAPES)
    assert str(checked.value) == str(explained.value)


def test_rules_invariants_and_costing_name_no_technique():
    names = "|".join(re.escape(n) for n in registry())
    for path in ("rules.py", "recipe.py", "algebra/invariants.py", "search/space.py"):
        code = (SRC / path).read_text()
        assert not re.search(r"\.name\s*[!=]=|getattr\(step|== \"sensitivity\"", code), path
        assert not re.search(rf"[!=]= [\"']({names})[\"']", code), path
