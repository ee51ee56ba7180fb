"""Shared settings are declared once (techniques/fields.py): one type and constraint set in every technique,
unchanged recipe hashes, error messages that name the field, the value and what is allowed."""

import math
from typing import Annotated, ClassVar

import pytest
import torch
from pydantic import Field, TypeAdapter, ValidationError

from lmcompose import Recipe
from lmcompose.algebra import Dense, QuantSpec
from lmcompose.algebra.spec import LinearSpec
from lmcompose.core.stats import StatsAccumulator
from lmcompose.runtime.linear import CompressedLinear
from lmcompose.techniques.base import _REGISTRY, Technique, register
from lmcompose.techniques.fields import SETTINGS, only_with, setting
from lmcompose.techniques.registry import get_technique, registry

# Hashes computed before the settings were shared; a recipe that does not mention a new field keeps its hash.
# Only DAM's changed, because DAM gained `scale_dtype` (dam: ff4068b69a73 -> d54f040e8f6e, dam_rtn:
# 40da3f252472 -> f498ef9efd87).
PINNED = {
    "f36c30e93513": [{"gptq": {"bits": 4, "group_size": 128, "act_order": True}}],
    "cf2ee87822ae": [{"gptq": {}}],
    "b39fcd30bd75": [{"gptq": {"bits": 3, "group_size": 64, "true_sequential": True, "percdamp": 0.02,
                               "blocksize": 64, "static_groups": True, "symmetric": True, "scale_dtype": "bf16"}}],
    "c58a99954623": [{"rtn": {"bits": 4, "group_size": 64}}],
    "5093e7b2d354": [{"rtn": {"ratio": 0.3}}],
    "bdaef3251d8a": [{"sparsegpt": {"sparsity": 0.5}}],
    "d1f79daf6fb2": [{"sparsegpt": {"sparsity": 0.5, "bits": 4, "group_size": 128}}],
    "bbcb709da9d5": [{"sparsegpt": {"pattern": "2:4", "bits": 4, "symmetric": True, "scale_dtype": "fp32",
                                    "percdamp": 0.05}}],
    "eb269bea23ef": [{"qer": {"bits": 3, "group_size": 32, "rank": 4, "scaling": "exact"}}],
    "f80c368360b8": [{"qer": {"bits": 4, "group_size": 128, "ratio": 0.3, "quantizer": "gptq", "act_order": True,
                              "percdamp": 0.1}}],
    "13a3715d7379": [{"l2qer": {"bits": 4, "rank": 8}}],
    "d54f040e8f6e": [{"dam": {"ratio": 0.3, "bits": 4, "group_size": 64}}],
    "f498ef9efd87": [{"dam": {"rank": 16, "bits": 3, "mode": "l_then_q", "quantizer": "rtn"}}],
    "be490d63b080": [{"sslc": {"ratio": 0.5}}],
    "927289fcfce7": [{"sslc": {"sparsity": 0.5, "rank": 8, "salience": "obs", "percdamp": 0.05,
                               "finetune_steps": 10}}],
    "3e03acf73a72": [{"oats": {"ratio": 0.5}}],
    "6266695eeb76": [{"wanda": {"sparsity": 0.5}}],
    "1ef792c9dbc8": [{"wanda": {"pattern": "2:4"}}, {"rtn": {"bits": 4, "group_size": 64, "target": "sparse"}}],
    "b94b70da7866": [{"magnitude": {"sparsity": 0.3, "scope": "matrix"}}],
    "ff50ef4f1cbc": [{"svdllm": {"ratio": 0.8}}],
    "08f8a11c7163": [{"svd": {"rank": 8, "allow_offgrid": True}}],
    "3194c9345566": [{"asvd": {"ratio": 0.8}}],
    "807dd37544bc": [{"svdllm": {"ratio": 0.8, "allocation": "sensitivity"}}, {"gptq": {"bits": 4, "target": "lowrank"}}],
}


@pytest.mark.parametrize("expected", sorted(PINNED))
def test_recipe_hashes_are_pinned(expected):
    recipe = Recipe(steps=PINNED[expected])
    assert recipe.hash() == expected
    assert Recipe.from_yaml(recipe.to_yaml()).hash() == expected


def _holders(name):
    return [(tech, cls) for tech, cls in sorted(registry().items()) if name in cls.model_fields]


def test_the_shared_settings_are_where_they_were():
    holders = {name: {t for t, _ in _holders(name)} for name in SETTINGS}
    quant = {"gptq", "rtn", "sparsegpt", "dam", "qer", "lqer", "l2qer", "qera", "awq"}
    assert holders["bits"] == holders["group_size"] == holders["symmetric"] == holders["scale_dtype"] == quant
    assert holders["percdamp"] == {"gptq", "sparsegpt", "dam", "qer", "lqer", "l2qer", "qera", "sslc", "oats"}
    assert holders["act_order"] == {"gptq", "dam", "qer", "lqer", "l2qer", "qera"}
    assert holders["static_groups"] == {"gptq", "qer", "lqer", "l2qer", "qera"}


BAD = {"bits": [1, 9, "x"], "group_size": [0, -3], "symmetric": ["maybe"], "scale_dtype": ["fp8"],
       "act_order": ["x"], "static_groups": ["x"], "percdamp": [-0.01, math.nan, math.inf], "blocksize": [0]}
GOOD = {"bits": [2, 8], "group_size": [1, 128], "symmetric": [True], "scale_dtype": ["fp16", "bf16", "fp32"],
        "act_order": [True], "static_groups": [True], "percdamp": [0.0, 0.01, 1.0], "blocksize": [1, 128]}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_shared_setting_has_one_constraint_everywhere(name):
    canonical = setting(name)
    assert set(BAD) == set(GOOD) == set(SETTINGS)
    holders = _holders(name)
    assert holders
    for tech, cls in holders:
        info = cls.model_fields[name]
        # repr, not ==: pydantic's general-metadata objects compare by identity in some versions
        assert repr(info.metadata) == repr(canonical.metadata), (tech, info.metadata)
        assert info.annotation in (SETTINGS[name].type, SETTINGS[name].type | None), tech
        adapter = TypeAdapter(Annotated[info.annotation, info])
        for value in GOOD[name]:
            assert adapter.validate_python(value) == value
        for value in BAD[name]:
            with pytest.raises(ValidationError):
                adapter.validate_python(value)


def test_percdamp_is_zero_or_more_and_finite():
    assert SETTINGS["percdamp"].constraints == {"ge": 0, "allow_inf_nan": False}
    assert get_technique("sparsegpt")(sparsity=0.5, percdamp=0).percdamp == 0  # was gt=0 here and in sslc
    assert get_technique("sslc")(ratio=0.5, percdamp=0, salience="obs").percdamp == 0


def test_existing_defaults_are_unchanged():
    expect = {"gptq": dict(bits=None, group_size=None, symmetric=False, scale_dtype="fp16", act_order=False,
                           static_groups=False, percdamp=0.01, blocksize=128),
              "rtn": dict(bits=None, group_size=None, symmetric=False, scale_dtype="fp16"),
              "sparsegpt": dict(bits=None, group_size=None, symmetric=False, scale_dtype="fp16", percdamp=0.01,
                                blocksize=128),
              "dam": dict(bits=4, group_size=None, symmetric=True, scale_dtype="fp16", act_order=False,
                          percdamp=0.01, blocksize=128),
              "qer": dict(bits=4, group_size=None, symmetric=False, scale_dtype="fp16", act_order=False,
                          static_groups=False, percdamp=0.01, blocksize=128),
              "sslc": dict(percdamp=0.01), "oats": dict(percdamp=0.01)}
    for tech, defaults in expect.items():
        fields = get_technique(tech).model_fields
        assert {k: fields[k].default for k in defaults} == defaults, tech


@pytest.mark.parametrize("tech, params, field, value, allowed", [
    ("gptq", {}, "bits", 9, "less than or equal to 8"),
    ("gptq", {}, "percdamp", -0.1, "greater than or equal to 0"),
    ("gptq", {}, "percdamp", math.inf, "finite number"),
    ("sparsegpt", {"sparsity": 0.5}, "percdamp", -1, "greater than or equal to 0"),
    ("sparsegpt", {"sparsity": 0.5, "bits": 4}, "scale_dtype", "fp8", "'fp16', 'bf16' or 'fp32'"),
    ("qer", {"rank": 4}, "group_size", 0, "greater than or equal to 1"),
    ("dam", {"rank": 4}, "scale_dtype", "fp8", "'fp16', 'bf16' or 'fp32'"),
    ("dam", {"rank": 4}, "bits", 1, "greater than or equal to 2"),
    ("sslc", {"ratio": 0.5}, "percdamp", math.nan, "finite number"),
])
def test_bad_values_name_the_field_the_value_and_what_is_allowed(tech, params, field, value, allowed):
    with pytest.raises(ValueError) as err:
        Recipe(steps=[{tech: {**params, field: value}}])
    message = str(err.value)
    assert f"steps[0].{tech}.{field}" in message and f"got {value!r}" in message and allowed in message


@pytest.mark.parametrize("tech, params, match", [
    ("sparsegpt", {"sparsity": 0.5, "group_size": 32}, r"^group_size=32 needs bits \(2\.\.8\)"),
    ("sparsegpt", {"sparsity": 0.5, "symmetric": True, "scale_dtype": "fp32"},
     r"^symmetric=True, scale_dtype='fp32': each needs bits"),
    ("qer", {"rank": 4, "static_groups": True}, r"^static_groups=True applies to quantizer='gptq' only; got "
     r"quantizer='rtn'"),
    ("dam", {"rank": 4, "quantizer": "rtn", "blocksize": 64}, r"^blocksize=64 only applies with quantizer='gptq'"),
    ("dam", {"rank": 4, "mode": "l_then_q", "lr": 0.1, "steps": 3},
     r"^steps=3, lr=0.1: each only applies with mode='dam' \(got mode='l_then_q'\)"),
    ("dam", {"rank": 4, "seed": 2}, r"^seed=2 only applies with act_bits=8"),
    ("sslc", {"pattern": "2:4", "ratio": 0.7, "scope": "matrix"}, r"^scope='matrix' does not apply to pattern='2:4'"),
])
def test_fields_that_do_not_apply_are_refused_naming_field_and_value(tech, params, match):
    with pytest.raises(ValueError, match=rf"^steps\[0\]\.{tech}: " + match.removeprefix("^")):
        Recipe(steps=[{tech: params}])


def test_defaults_of_fields_that_do_not_apply_pass_so_params_round_trip():
    for cfg in (get_technique("sparsegpt")(sparsity=0.5), get_technique("qer")(rank=4),
                get_technique("dam")(rank=4, mode="l_then_q", quantizer="rtn")):
        assert type(cfg)(**cfg.params()) == cfg


def test_only_with_reads_the_declared_default_of_the_class():
    class Toy(Technique):
        name: ClassVar[str] = "toy-only-with"
        knob: int = Field(3)

    only_with(Toy(), ("knob",), False, "never applies")  # the default passes
    only_with(Toy(knob=4), ("knob",), True, "applies")
    with pytest.raises(ValueError, match="^knob=4 never applies$"):
        only_with(Toy(knob=4), ("knob",), False, "never applies")


def test_register_refuses_a_shared_setting_declared_with_other_constraints():
    class Drifted(Technique):
        name: ClassVar[str] = "drifted-percdamp"
        percdamp: float = Field(0.01, gt=0)

    class Retyped(Technique):
        name: ClassVar[str] = "retyped-bits"
        bits: float = setting("bits")

    for cls in (Drifted, Retyped):
        with pytest.raises(ValueError, match="shared setting must be declared with techniques.fields.setting"):
            register(cls)
        assert cls.name not in _REGISTRY


def test_dam_scale_dtype_reaches_its_quant_spec_and_bytes():
    dam = get_technique("dam")
    assert dam(rank=8).qspec() == QuantSpec(4, None, True)  # the default is what DAM stored before: fp16 scales
    spec = LinearSpec.dense(32, 64)
    plans = {dt: dam(rank=8, group_size=16, scale_dtype=dt).plan(spec) for dt in ("fp16", "fp32")}
    assert all(t.quant.scale_dtype == dt for dt, p in plans.items() for t in p.terms[0].tensors().values())
    assert plans["fp32"].nbytes() > plans["fp16"].nbytes()
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    acc = StatsAccumulator(64)
    acc.update(torch.randn(256, 64, generator=torch.Generator().manual_seed(1)))
    layer = CompressedLinear(64, 32, [Dense(w.half())])
    new, _ = dam(rank=8, group_size=16, scale_dtype="bf16", steps=3).apply(layer, acc.result())
    assert {q.spec.scale_dtype for q in new.terms[0].slots().values() if hasattr(q, "spec")} == {"bf16"}
    assert new.spec() == dam(rank=8, group_size=16, scale_dtype="bf16").plan(layer.spec())
