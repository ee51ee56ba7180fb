"""Named recipes for common jobs. ``lmcompose compress --preset NAME`` uses them; the default one is
what ``lmcompose compress`` runs when no recipe is given."""

from __future__ import annotations

from .recipe import Recipe

PRESETS: dict[str, dict] = {
    # The default: GPTQ 4-bit, group 128, on 32 C4 windows of 512 tokens (16k tokens; GPTQ's quality
    # changes little beyond this on small models, and it keeps the main job to minutes on a laptop CPU).
    "gptq-w4g128": {"calibration": {"n": 32}, "steps": [{"gptq": {"bits": 4, "group_size": 128}}]},
    "gptq-w3g64": {"steps": [{"gptq": {"bits": 3, "group_size": 64}}]},
    "wanda-50": {"steps": [{"wanda": {"sparsity": 0.5}}]},
    "sparsegpt-2:4-w4g64": {"steps": [{"sparsegpt": {"pattern": "2:4"}},
                                      {"gptq": {"bits": 4, "group_size": 64, "target": "sparse"}}]},
    "svdllm-80": {"steps": [{"svdllm": {"ratio": 0.8}}]},
    "rtn-w4g64": {"steps": [{"rtn": {"bits": 4, "group_size": 64}}]},
    "rtn-w8": {"steps": [{"rtn": {"bits": 8}}]},
    "magnitude-50": {"steps": [{"magnitude": {"sparsity": 0.5}}]},
    "magnitude-2:4": {"steps": [{"magnitude": {"pattern": "2:4"}}]},
    "magnitude-50-w4g64": {"steps": [{"magnitude": {"sparsity": 0.5}},
                                     {"rtn": {"bits": 4, "group_size": 64, "target": "sparse"}}]},
}
DEFAULT_PRESET = "gptq-w4g128"


def get_preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; allowed: {sorted(PRESETS)}")
    return Recipe.from_dict(PRESETS[name])
