"""One currency for budgets: `ratio` = fraction of a Linear's fp16 bytes to keep, all storage counted.

Each technique maps its native knob (sparsity, rank, bits) to bytes through the algebra's specs; this
module finds the knob that fits a byte budget.
"""

from __future__ import annotations

from typing import Callable

from ..algebra.spec import LinearSpec
from ..core.errors import IllegalStep


def largest_within(budget: float, lo: int, hi: int, cost: Callable[[int], int], what: str) -> int:
    """Largest integer knob in [lo, hi] whose cost fits `budget` (cost must grow with the knob)."""
    if cost(lo) > budget:
        raise IllegalStep(f"even {what}={lo} costs {cost(lo)} bytes, more than the budget of {int(budget)} bytes")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def budget_bytes(spec: LinearSpec, ratio: float) -> float:
    return ratio * spec.dense_fp16_nbytes()


def ratio_of(spec: LinearSpec) -> float:
    return spec.nbytes() / spec.dense_fp16_nbytes()
