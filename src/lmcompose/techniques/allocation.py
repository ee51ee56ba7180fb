"""Sensitivity-based allocation of one step's byte budget across Linears (ASVD-style, METHODS §4.6).

A step with ``ratio`` and ``allocation: sensitivity`` tries every targeted Linear at each candidate ratio
(``allocation_ratios × ratio``) on the dense prepass, with the technique's own ``plan`` (exact bytes) and
``apply`` (relative output error), and a multiple-choice knapsack (`solve_allocation`) picks one ratio per
Linear to minimise the parameter-weighted error within the step's total bytes. ASVD measures perplexity
with one layer compressed at a time; we measure the layer's own output error, with no extra forward.

Method notes: docs/methods/allocation.md

Example::

    steps:
      - gptq: {ratio: 0.2, group_size: 128, allocation: sensitivity}   # mixes 2-, 3- and 4-bit Linears
"""

from __future__ import annotations

import logging
import math

from ..algebra.terms import Dense, as_float
from ..core.errors import IllegalStep
from ..runtime.linear import CompressedLinear
from .apply import apply_steps

log = logging.getLogger(__name__)


def solve_allocation(options: list[list[tuple[int, float]]], budget: float) -> list[int]:
    """Pick one option per item to minimise the summed value with summed cost ≤ `budget`.

    ``options[l]`` lists ``(cost, value)`` pairs for item l. Lagrangian relaxation: for a multiplier λ
    each item takes argmin value + λ·cost; λ is bisected to the smallest value whose choice fits; the
    bytes left over then buy, greedily, the upgrades with the best value decrease per byte. Returns the
    chosen index per item. Raises ValueError when even the cheapest options exceed `budget`.
    """
    cheapest = [min(range(len(o)), key=lambda k: (o[k][0], o[k][1])) for o in options]
    if sum(options[l][k][0] for l, k in enumerate(cheapest)) > budget:
        raise ValueError(f"even the cheapest options cost {sum(options[l][k][0] for l, k in enumerate(cheapest))} "
                         f"bytes, more than the budget of {budget:.0f}")

    def pick(lam: float) -> list[int]:
        return [min(range(len(o)), key=lambda k: (o[k][1] + lam * o[k][0], o[k][0])) for o in options]

    def cost(choice) -> float:
        return sum(options[l][k][0] for l, k in enumerate(choice))

    lo, hi = 0.0, 1.0
    while cost(pick(hi)) > budget:
        hi *= 4
        if hi > 1e30:
            break
    choice = pick(hi) if cost(pick(hi)) <= budget else cheapest
    if cost(pick(lo)) <= budget:
        choice = pick(lo)
    else:
        for _ in range(100):
            mid = (lo + hi) / 2
            if cost(pick(mid)) <= budget:
                hi, choice = mid, pick(mid)
            else:
                lo = mid
    # greedy fill: the best value decrease per extra byte, while it fits
    spent = cost(choice)
    while True:
        best, gain = None, 0.0
        for l, o in enumerate(options):
            c0, v0 = o[choice[l]]
            for k, (c, v) in enumerate(o):
                extra = c - c0
                if v < v0 and spent + extra <= budget:
                    rate = (v0 - v) / max(extra, 1e-9)
                    if rate > gain:
                        best, gain = (l, k, extra), rate
        if best is None:
            return choice
        l, k, extra = best
        choice[l] = k
        spent += extra


def candidate_ratios(ratio: float, multiples) -> list[float]:
    return sorted({round(min(1.0, ratio * m), 6) for m in multiples if ratio * m > 0})


def allocate_by_sensitivity(step, blocks, float_dtype: str) -> dict[str, object]:
    """Per-Linear copies of `step` (``allocation: sensitivity``) from the dense prepass `blocks`:
    ``blocks[i]`` lists ``(name, weight, stats)`` of block i's targeted Linears. Each candidate runs through
    `apply_steps` (checks included) on the weight stored in `float_dtype`, the recipe's, as the pipeline runs
    the chosen one; a Linear's statistics move to its weight's device for that. See the module docstring."""
    uniform = {"allocation": "uniform"}
    ratios = candidate_ratios(step.ratio, step.allocation_ratios)
    names, options, chosen_steps, fp16 = [], [], [], 0
    for linears in blocks:
        for name, weight, stats in linears:
            layer = CompressedLinear(weight.shape[1], weight.shape[0], [Dense(as_float(weight, float_dtype))])
            stats = stats.to(weight.device)
            spec = layer.spec()
            fp16 += spec.dense_fp16_nbytes()
            seen, opts, steps = {}, [], []
            for r in ratios:
                candidate = step.model_copy(update={"ratio": r, **uniform})
                try:
                    planned = candidate.plan(spec)
                except IllegalStep:
                    continue  # this ratio cannot be met by the technique on this shape
                key = planned.describe(), planned.nbytes()
                if key in seen:  # another ratio that stores the same thing (e.g. the same bit width)
                    continue
                _, (result,) = apply_steps(layer, [candidate], stats, name, original=weight)
                seen[key] = True
                opts.append((planned.nbytes(), weight.numel() * result.rel_error))
                steps.append(candidate)
            if not opts:
                raise IllegalStep(f"{step.name}: no candidate ratio of {ratios} applies to {name} {spec.describe()}")
            names.append(name)
            options.append(opts)
            chosen_steps.append(steps)
    budget = step.ratio * fp16
    choice = solve_allocation(options, budget)
    spent = sum(options[l][k][0] for l, k in enumerate(choice))
    log.info("%s sensitivity allocation: %d Linears, %.4f of fp16 bytes (budget %.4f), ratios used %s",
             step.name, len(names), spent / fp16, step.ratio,
             sorted({chosen_steps[l][k].ratio for l, k in enumerate(choice)}))
    if not math.isfinite(spent) or spent > budget + 1e-6:
        raise RuntimeError(f"allocation overspent: {spent} > {budget}")
    return {name: chosen_steps[l][k] for l, (name, k) in enumerate(zip(names, choice))}
