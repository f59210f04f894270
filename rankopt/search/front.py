"""2-D fronts and hypervolume of ``(accuracy, cost)`` points (the search's progress line,
screening and the results' report all use them)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["pareto_front_2d", "hypervolume_2d"]


def pareto_front_2d(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points of ``(accuracy, cost)``: accuracy up, cost down."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], -points[i][0]))
    front, best = [], -math.inf
    for i in order:
        if points[i][0] > best:
            front.append(i)
            best = points[i][0]
    return front


def hypervolume_2d(points: Iterable[tuple[float, float]], baseline_cost: float) -> float:
    """Area dominated by ``(accuracy, cost)`` points against (accuracy 0, ``baseline_cost``),
    with cost divided by ``baseline_cost``: in [0, 1] for accuracies in [0, 1].

    Written out because Optuna exposes no public hypervolume function and the 2-D
    case is an exact sweep: the dominated height at cost c is the best accuracy of
    the points costing at most c.
    """
    pts = sorted(
        (cost / baseline_cost, max(0.0, acc)) for acc, cost in points if cost < baseline_cost
    )
    area, height = 0.0, 0.0
    for k, (cost, acc) in enumerate(pts):
        height = max(height, acc)
        right = pts[k + 1][0] if k + 1 < len(pts) else 1.0
        area += height * (right - cost)
    return area
