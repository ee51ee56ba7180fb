"""Settings shared by several techniques, declared once: their type, constraints and meaning.

A technique that has a quantizer setting declares it as ``percdamp: float = setting("percdamp")`` (with
its own default where it differs: ``bits: int | None = setting("bits", None)``), never with its own
``Field``; ``register`` refuses a technique whose field of a shared name has other constraints or another
type, so the rule holds for techniques added later. The defaults of existing techniques differ on
purpose (``bits`` is optional for rtn/gptq, 4 for dam/qer; dam's grid is symmetric) and stay as they are.

``percdamp`` is ``>= 0`` and finite everywhere: 0 (no damping) is legal, and a Hessian that is not
positive definite without damping fails at its Cholesky factorization with a message that names the
layer and asks for a larger percdamp (``core.linalg.damped_inverse_cholesky``).

`only_with` is the one validator for "this field only applies when ...": a field that has no effect
must keep its declared default (defaults pass, so ``params()`` round-trips).

`strict_values` is what every settings model (techniques, the recipe's calibration and recovery) runs
before pydantic sees a value: no boolean or string becomes a number (``group_size: true`` would be 1,
``bits: " 4 "`` 4), no number or string becomes a boolean, every float is finite (also inside lists and
dicts), and no count exceeds `MAX_COUNT` (seeds lie in ``[0, 2**32)``). Each refusal names the field,
the value and what is allowed.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Annotated, Any, Iterable, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, Field, model_validator
from pydantic.fields import FieldInfo

from ..core.messages import shown

ScaleDtype = Literal["fp16", "bf16", "fp32"]


@dataclass(frozen=True)
class Setting:
    """One shared setting: the value type (a field may also allow None), default, constraints, meaning."""

    type: Any
    default: Any
    description: str
    constraints: dict = field(default_factory=dict)


SETTINGS: dict[str, Setting] = {
    "bits": Setting(int, 4, "bits per weight code", {"ge": 2, "le": 8}),
    "group_size": Setting(int, None, "input columns per scale; None = one scale per row. A width it does not "
                          "divide ends with a shorter group", {"ge": 1}),
    "symmetric": Setting(bool, False, "symmetric grid (no stored zero point) or asymmetric (min-max)"),
    "scale_dtype": Setting(ScaleDtype, "fp16", "storage dtype of the scales"),
    "act_order": Setting(bool, False, "process columns by decreasing diag(H); with a group size, groups follow "
                         "that order and the permutation is stored (unless static_groups)"),
    "static_groups": Setting(bool, False, "with a group size: compute every group's grid up front on the "
                             "original column order (reference --static-groups; no permutation stored)"),
    "percdamp": Setting(float, 0.01, "damping λ added to diag(H), as a fraction of mean(diag H) (>= 0, finite)",
                        {"ge": 0, "allow_inf_nan": False}),
    "blocksize": Setting(int, 128, "columns per lazy-update block", {"ge": 1}),
}

_UNSET: Any = object()


def setting(name: str, default: Any = _UNSET, *, when: str | None = None, doc: str | None = None) -> FieldInfo:
    """The field of shared setting `name`, with its one set of constraints.

    `default` replaces the shared default; `when` prefixes the description with the condition under which
    the setting applies (``when="gptq only"`` -> "gptq only: ..."); `doc` replaces the description where
    the technique reads the setting differently (e.g. what None means). Constraints are never replaced.
    """
    s = SETTINGS[name]
    text = doc if doc is not None else s.description
    if when:
        text = f"{when}: {text}"
    return Field(s.default if default is _UNSET else default, description=text, **s.constraints)


def check_settings(cls: type[BaseModel]) -> None:
    """Raise ValueError if a field of `cls` named like a shared setting was not declared with `setting`."""
    for name, info in cls.model_fields.items():
        if name not in SETTINGS:
            continue
        s = SETTINGS[name]
        expected = repr(setting(name).metadata)
        if repr(info.metadata) != expected or info.annotation not in (s.type, s.type | None):
            raise ValueError(f"{cls.__name__}.{name}: a shared setting must be declared with "
                             f"techniques.fields.setting({name!r}) (type {s.type}, constraints {expected}); "
                             f"got type {info.annotation}, constraints {info.metadata!r}")


def only_with(model: BaseModel, fields: Iterable[str], applies: bool, why: str) -> None:
    """Raise ValueError naming each of `fields` that differs from its declared default when `applies` is
    false. `why`, in the singular, says what the field needs: ``"group_size=32 needs bits (2..8)"``, or for
    several fields ``"group_size=32, symmetric=True: each needs bits (2..8)"``."""
    if applies:
        return
    declared = type(model).model_fields
    changed = [f"{f}={getattr(model, f)!r}" for f in fields if getattr(model, f) != declared[f].default]
    if changed:
        raise ValueError(f"{changed[0]} {why}" if len(changed) == 1 else f"{', '.join(changed)}: each {why}")


def joined_parts(value, allowed: tuple[str, ...], example: str) -> str:
    """A set of parts given '+'-joined (``"lowrank+scales"``) or as a list, written back '+'-joined in the
    order of `allowed`, so equal sets are equal strings (and hash alike). Raises ValueError naming the
    allowed parts on an unknown, repeated or missing part."""
    parts = value.split("+") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not parts or any(p not in allowed for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"allowed: one or more of {list(allowed)}, each at most once, joined by '+' "
                         f"(e.g. {example}) or as a list")
    return "+".join(p for p in allowed if p in parts)


MAX_COUNT = 10**7  # no integer setting (steps, ranks, group sizes, windows, tokens) means anything beyond this
SEED_LIMIT = 2**32  # seeds lie in [0, 2**32): what every generator here accepts


def _options(annotation) -> tuple:
    """The alternatives of a field's type: ``int | None`` -> (int, NoneType); Annotated is looked through."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(o for a in get_args(annotation) for o in _options(a))
    return (annotation,)


def _kind(option) -> str:
    """'bool', 'int', 'float', 'floats' (a tuple or list of floats), 'float_map' (dict of floats) or 'other'."""
    if option in (bool, int, float):
        return option.__name__
    origin, args = get_origin(option), get_args(option)
    if origin in (tuple, list) and args and args[0] is float:
        return "floats"
    if origin is dict and len(args) == 2 and args[1] is float:
        return "float_map"
    return "other"


def allowed_text(name: str, info: FieldInfo) -> str:
    """What field `name` accepts, in words: ``an integer >= 2 and <= 8, or null``."""
    options = _options(info.annotation)
    bounds = []
    for m in info.metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None and isinstance(m, getattr(annotated_types, attr.capitalize())):
                bounds.append(f"{op} {getattr(m, attr)}")
    words = []
    for o in options:
        kind = _kind(o)
        if o is type(None):
            continue
        if kind == "int":
            if name == "seed":
                limits = [f">= 0 and < {SEED_LIMIT}"]
            else:
                limits = bounds if any(b[0] == "<" for b in bounds) else [*bounds, f"<= {MAX_COUNT:,}"]
            words.append(" and ".join(["an integer", *limits]).replace("integer and", "integer"))
        elif kind == "float":
            words.append(" and ".join(["a finite number", *bounds]).replace("number and", "number"))
        elif kind == "bool":
            words.append("true or false")
        elif kind == "floats":
            words.append("a non-empty list of finite numbers")
        elif kind == "float_map":
            words.append("a mapping of names to finite numbers")
        elif get_origin(o) is Literal:
            words.append("one of " + ", ".join(repr(a) for a in get_args(o)))
        else:
            words.append(getattr(o, "__name__", str(o).replace("typing.", "")))
    if type(None) in options:
        words.append("null")
    return ", or ".join(words)


def _number_problem(value, integer: bool, seed: bool) -> str | None:
    """Why `value` is not a number a numeric field takes, or None."""
    if isinstance(value, bool):
        return "a boolean is not a number"
    if isinstance(value, str):
        return "a string is not a number (write the number without quotes)"
    if not isinstance(value, (int, float)):
        return None  # pydantic names the type
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        finite = False
    if not finite:
        return "not a finite number"
    if integer and seed and not 0 <= value < SEED_LIMIT:
        return f"a seed lies in [0, {SEED_LIMIT})"
    if integer and not seed and abs(value) > MAX_COUNT:
        return f"more than {MAX_COUNT:,}"
    return None


def _field_problem(name: str, value, options: tuple) -> str | None:
    """Why `value` is refused by a field of type `options`, or None (other mistakes are left to pydantic)."""
    kinds = {_kind(o) for o in options if o is not type(None)}
    if value is None:
        return None
    if kinds == {"bool"}:
        return None if isinstance(value, bool) else "only true or false is a boolean"
    if kinds and kinds <= {"int", "float"}:
        return _number_problem(value, "float" not in kinds, name == "seed")
    if kinds == {"floats"} and isinstance(value, (list, tuple)):
        if not value:
            return "an empty list"
        return next((f"item {i}: {p}" for i, v in enumerate(value) if (p := _number_problem(v, False, False))),
                    None)
    if kinds == {"float_map"} and isinstance(value, dict):
        return next((f"{shown(k)}: {p}" for k, v in value.items() if (p := _number_problem(v, False, False))),
                    None)
    return None


def strict_values(cls: type[BaseModel], data):
    """Refuse, before pydantic's coercion, what `cls`'s fields must not take (see the module docstring).

    Use as ``model_validator(mode="before")``; other input (unknown keys, other types) is left to pydantic.
    The message reads ``FIELD: got VALUE: why; allowed: ...`` (`recipe._format_error` puts the location
    before it)."""
    if not isinstance(data, dict):
        return data
    for name, value in data.items():
        info = cls.model_fields.get(name) if isinstance(name, str) else None
        if info is None:
            continue
        problem = _field_problem(name, value, _options(info.annotation))
        if problem:
            raise ValueError(f"{name}: got {shown(value)}: {problem}; allowed: {allowed_text(name, info)}")
    return data


class StrictModel(BaseModel):
    """A config whose fields refuse bool/str coercion and non-finite or out-of-range values before pydantic
    converts them (`strict_values`): the base of techniques, recipes and search ranges."""

    @model_validator(mode="before")
    @classmethod
    def _strict(cls, data):
        return strict_values(cls, data)
