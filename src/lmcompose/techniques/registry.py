"""Looking techniques up by name. Importing ``lmcompose.techniques`` registers every technique (one import
line per technique file in its ``__init__``), so these functions always see all of them."""

from __future__ import annotations

from .base import _REGISTRY, Technique


def registry() -> dict[str, type[Technique]]:
    """Every registered technique by name (importing this package registered them)."""
    return dict(_REGISTRY)


def get_technique(name: str) -> type[Technique]:
    techniques = registry()
    if name not in techniques:
        raise ValueError(f"unknown technique {name!r}; allowed: {sorted(techniques)}")
    return techniques[name]


def describe_techniques() -> list[dict]:
    """Name, family, summary and parameters (with defaults and descriptions) of every technique."""
    out = []
    for name, cls in sorted(registry().items()):
        params = []
        for field, info in cls.model_fields.items():
            default = info.default if info.default is not None or not info.is_required() else "(required)"
            params.append({"name": field, "default": default, "type": str(info.annotation).replace("typing.", ""),
                           "description": info.description or ""})
        out.append({"name": name, "family": cls.family, "summary": cls.summary, "params": params})
    return out
