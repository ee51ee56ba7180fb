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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

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
