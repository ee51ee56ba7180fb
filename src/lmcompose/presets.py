"""Named recipes for common jobs. ``lmcompose compress --preset NAME`` uses them; the default one is
what ``lmcompose compress`` runs when no recipe is given."""

from __future__ import annotations

from .recipe import Recipe

PRESETS: dict[str, dict] = {
    # The default: GPTQ 4-bit, group 128, with act-order and static groups, on 128 C4 windows of 512 tokens
    # (65k tokens). It is the best 4-bit recipe BENCHMARKS.md measures at about 4.2 bits/weight: on
    # SmolLM2-135M it stores 4.169 bits/weight (the same bytes as plain GPTQ w4 g128: static groups store
    # no permutation) and reaches full-protocol perplexity 27.21 against 30.31 for plain GPTQ w4 g128, −10%
    # (BENCHMARKS.md, "search vs baselines", the "gptq w4 g128 (≤4.2)" row and the act-order + static groups
    # reading beside it; the sensitivity-allocated variant, 27.23, adds nothing). With 32 windows GPTQ
    # overfits its calibration set: on SmolLM2's down_proj (1536 inputs) its WikiText-2 layer error was 3%
    # *worse* than RTN's at 3 bits, and 7% better with 128 windows (BENCHMARKS.md, calibration size).
    "gptq-w4g128-act-order": {"steps": [{"gptq": {"bits": 4, "group_size": 128, "act_order": True,
                                                  "static_groups": True}}]},
    # The default before: plain GPTQ (columns in their natural order); kept for comparison and old scripts.
    "gptq-w4g128": {"steps": [{"gptq": {"bits": 4, "group_size": 128}}]},
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
DEFAULT_PRESET = "gptq-w4g128-act-order"


def get_preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; allowed: {sorted(PRESETS)}")
    return Recipe.from_dict(PRESETS[name])
