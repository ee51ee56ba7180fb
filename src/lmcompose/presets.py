"""Named recipes for common jobs. ``lmcompose compress --preset NAME`` uses them; the default one is
what ``lmcompose compress`` runs when no recipe is given."""

from __future__ import annotations

from .recipe import Recipe

PRESETS: dict[str, dict] = {
    "rtn-w4g64": {"steps": [{"rtn": {"bits": 4, "group_size": 64}}]},
    "rtn-w8": {"steps": [{"rtn": {"bits": 8}}]},
    "magnitude-50": {"steps": [{"magnitude": {"sparsity": 0.5}}]},
    "magnitude-2:4": {"steps": [{"magnitude": {"pattern": "2:4"}}]},
    "magnitude-50-w4g64": {"steps": [{"magnitude": {"sparsity": 0.5}},
                                     {"rtn": {"bits": 4, "group_size": 64, "target": "sparse"}}]},
}
DEFAULT_PRESET = "rtn-w4g64"


def get_preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; allowed: {sorted(PRESETS)}")
    return Recipe.from_dict(PRESETS[name])
