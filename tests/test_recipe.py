"""Recipes: validation names the bad field, YAML round trip, hash, typing and costing."""

import pytest

from lmcompose.core.errors import IllegalStep
from lmcompose.recipe import Recipe
from lmcompose.techniques.registry import describe_techniques

GOOD = {"schedule": "step-major", "steps": [{"magnitude": {"pattern": "2:4"}},
                                            {"rtn": {"bits": 4, "group_size": 64, "target": "sparse"}}]}


def test_yaml_roundtrip_and_hash():
    recipe = Recipe.from_dict(GOOD)
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.hash() == recipe.hash()
    other = Recipe.from_dict({**GOOD, "schedule": "layer-major"})
    assert other.hash() != recipe.hash()
    assert len({recipe, again, other}) == 2


def test_load_from_files(tmp_path):
    import json
    (tmp_path / "r.json").write_text(json.dumps(GOOD))
    (tmp_path / "r.yaml").write_text(Recipe.from_dict(GOOD).to_yaml())
    assert Recipe.load(tmp_path / "r.json") == Recipe.load(tmp_path / "r.yaml")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        Recipe.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("data, field, value", [
    ({"steps": [{"rtn": {"bits": 9}}]}, "steps[0].rtn.bits", "9"),
    ({"steps": [{"rtn": {"bitz": 4}}]}, "steps[0].rtn.bitz", "unknown key"),
    ({"steps": [{"magnitude": {"pattern": "5:4"}}]}, "steps[0].magnitude.pattern", "5:4"),
    ({"steps": [{"magnitude": {"sparsity": 1.5}}]}, "steps[0].magnitude.sparsity", "1.5"),
    ({"steps": [{"magnitude": {}}]}, "steps[0].magnitude", "sparsity"),
    ({"steps": [{"prune_everything": {}}]}, "steps[0]", "prune_everything"),
    ({"steps": [{"rtn": {}, "magnitude": {}}]}, "steps[0]", "exactly one key"),
    ({"schedule": "random"}, "schedule", "random"),
    ({"calibration": {"n": 0}}, "calibration.n", "0"),
    ({"colour": "blue"}, "colour", "unknown key"),
])
def test_bad_recipe_names_field_and_value(data, field, value):
    with pytest.raises(ValueError) as err:
        Recipe.from_dict(data)
    assert field in str(err.value) and value in str(err.value)


SHAPES = {"model.layers.0.mlp.up_proj": (1536, 576), "model.layers.0.self_attn.q_proj": (576, 576)}


def test_check_costs_before_loading():
    result = Recipe.from_dict({"steps": [{"rtn": {"bits": 4, "group_size": 128}}]}).check(SHAPES)
    # 4-bit codes + fp16 scale and 4-bit zero per group of 128 (576 = 4*128 + 64: five groups per row)
    expected = sum(o * i // 2 + o * 5 * 2 + (o * 5 * 4 + 7) // 8 for o, i in SHAPES.values())
    assert result.linear_bytes == expected


def test_illegal_chains_name_step_and_reason():
    with pytest.raises(IllegalStep, match=r"steps\[1\]\.rtn.*already quantized"):
        Recipe.from_dict({"steps": [{"rtn": {"bits": 4}}, {"rtn": {"bits": 2}}]}).check(SHAPES)
    with pytest.raises(IllegalStep, match="divisible by 7"):
        Recipe.from_dict({"steps": [{"magnitude": {"pattern": "3:7"}}]}).check(SHAPES)
    with pytest.raises(IllegalStep, match="select no Linear"):
        Recipe.from_dict({"steps": [{"rtn": {"bits": 4, "include": ["*.k_proj"]}}]}).check(SHAPES)
    with pytest.raises(IllegalStep, match="target='lowrank' matches no term"):
        Recipe.from_dict({"steps": [{"rtn": {"bits": 4, "target": "lowrank"}}]}).check(SHAPES)


def test_ratio_budget_fits_and_is_tight():
    for ratio in (0.3, 0.5, 0.7):
        r = Recipe.from_dict({"steps": [{"magnitude": {"ratio": ratio}}]}).check(SHAPES)
        assert r.linear_bytes <= ratio * r.linear_dense_bytes
        assert r.linear_bytes > (ratio - 0.01) * r.linear_dense_bytes
    bits = Recipe.from_dict({"steps": [{"rtn": {"ratio": 0.3, "group_size": 64}}]}).check(SHAPES)
    assert "int4" in bits.specs["model.layers.0.mlp.up_proj"].describe()


def test_every_technique_is_described_with_defaults():
    described = {d["name"]: d for d in describe_techniques()}
    assert {"magnitude", "rtn"} <= set(described)
    params = {p["name"]: p for p in described["rtn"]["params"]}
    assert params["group_size"]["default"] is None and params["symmetric"]["default"] is False


def test_presets_are_valid_recipes():
    from lmcompose.presets import DEFAULT_PRESET, PRESETS, get_preset

    assert DEFAULT_PRESET in PRESETS
    for name in PRESETS:
        get_preset(name).check(SHAPES)
