"""Composition rules as data: what each step does to a Linear's type, and what the literature prefers.

Hard rules are enforced by the techniques' ``plan`` (a step that cannot apply raises ``IllegalStep``) and
by the pipeline's invariant checks; they are listed here so `explain` can name them. Preference rules
are soft: a recipe that contradicts one still runs, and `explain` warns with the rule's source. The
rules are METHODS.md §3.5 (R1–R6), a design consistent with the composability study of Hu and Wang
(2026), whose exact rules are not public.

Example::

    for step in explain(Recipe.load("r.yaml"), shapes):
        print(step.name, step.structure, step.linear_bytes, [w.rule.id for w in step.warnings])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from .algebra.spec import LinearSpec
from .recipe import CheckResult, Recipe, uncompressed_bytes


@dataclass(frozen=True)
class Rule:
    id: str
    kind: Literal["hard", "preference"]
    statement: str
    source: str


@dataclass
class Finding:
    rule: Rule
    step: int
    message: str


@dataclass
class StepExplanation:
    """One step over all the Linears it targets: types in and out, bytes after it, rules that apply."""

    index: int
    name: str
    family: str
    params: dict
    targets: int
    structure_in: list[str]
    structure_out: list[str]
    linear_bytes: int
    bits_per_weight: float
    ratio_of_fp16: float
    applies: list[str] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)


RULES = {r.id: r for r in [
    Rule("R1", "preference", "prune before quantizing (S→Q): quantizing first moves relative magnitudes, so the "
         "pruner can remove weights that mattered; pruning first keeps the block maxima and exact zeros",
         "Harma et al., ICLR 2025 (arXiv 2405.20935), tensor-level proof for magnitude pruning and max-scaled "
         "block quantization; METHODS §4.10"),
    Rule("R2", "preference", "decompose before quantizing, then quantize the factors (L→Q)",
         "DAM, Findings of ACL 2026 (claim; METHODS §1); SVD-LLM and ASVD quantize factors after SVD"),
    Rule("R3", "hard", "never take an SVD of an already quantized matrix: the factors leave the grid; to add a "
         "low-rank term after quantizing, fit the residual (QER)",
         "DAM reviewers; LQER/QERA (ICML 2024, ICLR 2025); METHODS §6 fact 2. Low-rank steps refuse quantized "
         "input unless allow_offgrid: true (analysis only)"),
    Rule("R4", "preference", "when pruning after quantization, use a mask-only pruner whose scores come from the "
         "weights before rounding, or prune first",
         "Towards a Unified Theory of Quantization and Sparsity (ICLR 2026 submission), QAS; METHODS §4.12"),
    Rule("R5", "preference", "steps that train (fine-tuned factors, learned scales) go before the final quantization",
         "P-KD-Q ordering study; METHODS §3.5"),
    Rule("R6", "hard", "budgets are exact bytes: values, indices, codes, scales, zero points, factors and "
         "permutations are all counted, and the saved file holds exactly the planned bytes",
         "METHODS §0 and §6 fact 5; enforced by LinearSpec.nbytes and the pipeline's invariant check"),
    Rule("R7", "preference", "use low rank as a complement, not the main carrier: alone it degrades fast beyond "
         "a 20–30% byte reduction",
         "SVD-LLM (ICLR 2025) LLaMA-7B 7.94 at 20% vs 42.3 at 60%; METHODS §6 fact 6"),
    Rule("R8", "preference", "a scale search for a quantization grid (AWQ) is followed, on each of its Linears, by "
         "the quantizer on exactly that grid: the scales are chosen for it",
         "AWQ (Lin et al., MLSys 2024): llm-awq auto_scale searches with the final quantizer's w_quantize_func"),
    Rule("R9", "hard", "a rotation of the residual stream (a model-level transform) comes before every pruning, "
         "low-rank and quantization step: masks, factors and grids are then chosen in the rotated basis, and a "
         "rotation after them would move every kept weight off its mask and grid",
         "QuaRot (Ashkboos et al., NeurIPS 2024) and SpinQuant (Liu et al., ICLR 2025) rotate, then quantize; "
         "enforced by Recipe.walk (model-unit steps lead); docs/methods/transforms.md"),
]}


def _is_quantized(spec: LinearSpec) -> bool:
    return any(t.quantized for term in spec.terms for t in term.tensors().values())


# Each preference check sees one Linear's structure before and after the step and returns a message
# when the step contradicts the rule.
Check = Callable[[object, LinearSpec, LinearSpec], "str | None"]


def _r1(step, before, after):
    if step.family == "prune" and _is_quantized(before):
        return f"{step.name} prunes an already quantized matrix (Q→S); S→Q is the recommended order (see R4)"
    return None


def _r2(step, before, after):
    if step.family == "lowrank" and _is_quantized(before):
        return f"{step.name} decomposes an already quantized matrix (Q→L); decompose first, then quantize the factors"
    return None


def _r5(step, before, after):
    # a step that retrains the grid itself (block reconstruction of scales, zeros, rounding) trains the
    # quantization, not weights a quantization will then round: it belongs after the quantizer
    if step.trains and _is_quantized(before) and not step.retrains_grid:
        return f"{step.name} trains after a quantization step"
    return None


def _r7(step, before, after):
    ratio = after.nbytes() / max(before.dense_fp16_nbytes(), 1)
    if step.family == "lowrank" and after.kinds() == ("lowrank",) and not _is_quantized(after) and ratio < 0.7:
        return f"{step.name} alone keeps {ratio:.0%} of the fp16 bytes"
    return None


def _grid(q) -> str:
    return f"int{q.bits} g{q.group_size or 'row'} {'sym' if q.symmetric else 'asym'} ({q.scale_dtype} scales)"


def _r8(step, name: str, later: list) -> str | None:
    """`step` prepares `name` for a grid: the next step on it (in `later` walks) should quantize on that grid."""
    grid = step.prepares_grid
    if grid is None:
        return None
    nxt = next((w for w in later if name in w.names), None)
    if nxt is None:
        return f"no step quantizes after {step.name}, which searched its scales for {_grid(grid)}"
    grids = [{t.quant for term in s.terms for t in term.tensors().values() if t.quant}
             for s in (nxt.before[name], nxt.after[name])]
    new = grids[1] - grids[0]
    if not new:
        return f"{nxt.step.name} follows {step.name} without quantizing; the scales were searched for {_grid(grid)}"
    if new != {grid}:
        return (f"{nxt.step.name} quantizes on {', '.join(sorted(_grid(q) for q in new))}; {step.name} searched "
                f"its scales for {_grid(grid)}")
    return None


PREFERENCE_CHECKS: dict[str, Check] = {"R1": _r1, "R2": _r2, "R5": _r5, "R7": _r7}
APPLIES = {"prune": ["R1", "R4", "R6"], "lowrank": ["R2", "R3", "R7", "R6"], "quantize": ["R1", "R2", "R6"],
           "joint": ["R5", "R6"], "transform": ["R6"]}


def _applies(step) -> list[str]:
    """The rules that bear on `step`: those of its family, R5 for any step that trains, R8 for one that
    prepares a grid, R9 for one that transforms the whole model."""
    rules = list(APPLIES.get(step.family, ["R6"]))
    rules = rules if not step.trains or "R5" in rules else ["R5", *rules]
    rules = rules if step.prepares_grid is None else ["R8", *rules]
    return rules if step.unit != "model" else ["R9", *rules]


def explain(recipe: Recipe, shapes: dict[str, tuple[int, int]]) -> list[StepExplanation]:
    """Walk `recipe` over the model's Linear shapes (no weights), one explanation per step.

    Raises ``IllegalStep`` (a hard rule) exactly as ``Recipe.check`` does: both are ``Recipe.walk``, and both
    refuse a recipe that stores more bytes than the dense Linears unless it says ``allow_growth: true``.
    """
    specs = recipe.linear_specs(shapes)
    dense_fp16 = {n: s.dense_fp16_nbytes() for n, s in specs.items()}
    uncompressed = uncompressed_bytes(specs)
    touched: set[str] = set()
    out = []
    walks = list(recipe.walk(specs))  # a hard rule raises: an illegal chain is refused, not explained
    for k, walked in enumerate(walks):
        i, step, names, before = walked.index, walked.step, walked.names, walked.before
        specs.update(walked.after)
        touched.update(names)
        linear_bytes = sum(specs[n].nbytes() for n in touched)
        weights = sum(specs[n].out_features * specs[n].in_features for n in touched)
        exp = StepExplanation(
            i, step.name, step.family, step.model_dump(mode="json", exclude_defaults=True), len(names),
            sorted({before[n].describe() for n in names}), sorted({specs[n].describe() for n in names}),
            linear_bytes, 8 * linear_bytes / weights, linear_bytes / sum(dense_fp16[n] for n in touched),
            applies=_applies(step))
        found = {rid: [check(step, before[n], specs[n]) for n in names] for rid, check in PREFERENCE_CHECKS.items()}
        found["R8"] = [_r8(step, n, walks[k + 1:]) for n in names]  # R8 reads the steps that follow
        for rid, messages in found.items():
            hits = [m for m in messages if m]
            if hits:  # one finding per rule and step, with the first Linear's words
                more = f" ({len(hits)} of {len(names)} Linears)" if len(hits) > 1 else ""
                exp.warnings.append(Finding(RULES[rid], i, hits[0] + more))
        out.append(exp)
    recipe.refuse_growth(CheckResult(specs, dense_fp16, sorted(touched)), uncompressed)
    return out
