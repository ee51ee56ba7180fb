"""Rules as data: explain walks a recipe without weights, and warns where a recipe contradicts a rule."""

import pytest
from helpers import tiny_llama

from lmcompose import Recipe
from lmcompose.cli import main
from lmcompose.core.errors import IllegalStep
from lmcompose.pipeline.blocks import linear_shapes
from lmcompose.rules import RULES, explain

SHAPES = linear_shapes(tiny_llama(layers=1))


def walk(steps):
    return explain(Recipe.from_dict({"steps": steps}), SHAPES)


def test_every_rule_has_a_source_and_a_kind():
    assert {r.kind for r in RULES.values()} == {"hard", "preference"}
    assert all(len(r.source) > 20 and r.statement for r in RULES.values())


def test_bytes_follow_the_chain_and_end_where_check_ends():
    steps = [{"sparsegpt": {"sparsity": 0.5}}, {"gptq": {"bits": 4, "group_size": 32}}]
    out = walk(steps)
    check = Recipe.from_dict({"steps": steps}).check(SHAPES)
    assert out[-1].linear_bytes == check.linear_bytes and out[0].linear_bytes > out[1].linear_bytes
    assert out[0].structure_in == ["dense[fp16]"] and out[1].structure_in == out[0].structure_out
    assert not [w for s in out for w in s.warnings]


def test_reversed_orders_warn_with_the_rule_and_its_source():
    q_then_s = walk([{"rtn": {"bits": 4}}, {"wanda": {"sparsity": 0.5}}])
    (w,) = q_then_s[1].warnings
    assert w.rule.id == "R1" and "Harma" in w.rule.source and w.step == 1
    q_then_l = walk([{"rtn": {"bits": 4}}, {"svd": {"ratio": 0.5, "allow_offgrid": True}}])
    assert [w.rule.id for w in q_then_l[1].warnings] == ["R2", "R7"]  # off-grid float factors at 50% of the bytes
    alone = walk([{"svdllm": {"ratio": 0.5}}])
    assert [w.rule.id for w in alone[0].warnings] == ["R7"]
    assert not walk([{"svdllm": {"ratio": 0.9}}])[0].warnings


def test_hard_rules_refuse_before_explaining():
    with pytest.raises(IllegalStep, match="quantized"):
        walk([{"rtn": {"bits": 4}}, {"svd": {"ratio": 0.5}}])


def test_cli_explain_prints_steps_rules_and_warnings(tmp_path, capsys):
    model_dir = tmp_path / "m"
    tiny_llama(layers=1).save_pretrained(model_dir, safe_serialization=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - rtn: {bits: 4}\n  - wanda: {sparsity: 0.5}\n")
    assert main(["recipe", "explain", str(recipe), "--model", str(model_dir)]) == 0
    printed = capsys.readouterr().out
    assert "warning" in printed and "R1" in printed and "Harma" in printed
