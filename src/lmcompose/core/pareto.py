"""The Pareto front of points where lower is better on every axis (bytes against a loss)."""

from __future__ import annotations

from typing import Sequence


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point beats: lower is better on every coordinate.

    A point is dominated when another is at most as large on every coordinate and smaller on one; equal
    points do not dominate each other, so both stay on the front.

    Example::

        pareto_front([(1, 5), (2, 3), (2, 4), (3, 3)])  # -> [0, 1]
    """
    pts = [tuple(p) for p in points]
    return [i for i, p in enumerate(pts)
            if not any(all(a <= b for a, b in zip(q, p)) and q != p for q in pts)]
