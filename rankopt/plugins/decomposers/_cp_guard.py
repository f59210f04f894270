"""The CP degeneracy guard's reading of one ALS run (used by :mod:`.cp`).

Kept apart from the decomposer so that its signs (term ratio, its growth, the error's
fall) can be read and tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ALSRun", "BORDER_EXPONENT", "DEGENERATE", "EXACT_FIT", "GROWTH_TOL", "term_ratio"]

DEGENERATE = "degenerate"
EXACT_FIT = 1e-6  # relative error of a fit that is exact up to round-off: never degenerate
# a growth of the term ratio below 1 % over the last half of the iterations: the terms settled
GROWTH_TOL = 0.01
# error * ratio**k about constant for k in this range: the error is bought by term growth
BORDER_EXPONENT = (1.0, 10.0)


@dataclass(frozen=True)
class ALSRun:
    """One finished CP-ALS run and the signs of degeneracy read from it.

    ``history`` holds ``(term ratio, relative error)`` after every iteration (the start first).
    """

    what: str
    weights: torch.Tensor
    factors: list[torch.Tensor]
    rel: float
    ratio: float
    history: tuple[tuple[float, float], ...]

    def _half(self) -> tuple[float, float]:
        """(growth of the term ratio, fall of the error) over the last half of the iterations."""
        if len(self.history) < 2:
            return 1.0, 1.0
        (ratio_mid, err_mid), (ratio_end, err_end) = self.history[len(self.history) // 2], self.history[-1]
        growth = ratio_end / ratio_mid if ratio_mid > 0 else 1.0
        fall = err_mid / err_end if err_end > 0 else math.inf
        return growth, fall

    def suspect(self, max_term_ratio: float) -> bool:
        """Terms above the bound and still growing (a converged fit's terms stay put)."""
        return self.rel > EXACT_FIT and self.ratio > max_term_ratio and self._half()[0] > 1 + GROWTH_TOL

    def bought_by_growth(self) -> bool:
        """The error falls in step with the terms' growth: a border-rank approach.

        Approaching a tensor of higher rank through its border, the error falls only as
        the cancelling terms grow, ``error * ratio**k`` about constant: ``k`` (the log fall
        of the error over the log growth of the ratio, last half of the iterations) is
        1 in the limit and 2.2-2.5 on the border-rank test kernel. A fit that converges has
        a large ``k`` (the error falls, the terms settle: 70 on a trained ResNet-20 kernel
        at R=259), one in a swamp a small one (the terms drift, the error stalls: 0.02-0.4).
        """
        growth, fall = self._half()
        if growth <= 1 + GROWTH_TOL or fall <= 1:
            return False
        return BORDER_EXPONENT[0] <= math.log(fall) / math.log(growth) <= BORDER_EXPONENT[1]

    def describe_degenerate(self, max_term_ratio: float) -> str:
        growth, fall = self._half()
        return (
            f"{self.what}: {DEGENERATE} (the rank-one terms' norm is {self.ratio:.3g} times the kernel's, "
            f"above max_term_ratio={max_term_ratio:g}, and grew {growth:.3g}x over the last half of the "
            f"iterations while the error fell {fall:.3g}x; relative error {self.rel:.3g})"
        )


def term_ratio(weights: torch.Tensor, factors: Sequence[torch.Tensor], norm: torch.Tensor | float) -> float:
    """``sqrt(sum_r ||term_r||^2) / norm``: the rank-one terms' energy against the kernel's.

    Terms that do not overlap give at most 1 (their energies add up to the
    approximation's). Far above 1 they cancel each other: the CP degeneracy of an ill-posed
    low-rank problem, where ALS lets the terms grow without bound while the error stalls.
    """
    per_term = weights.abs() * torch.stack([torch.linalg.vector_norm(f, dim=0) for f in factors]).prod(dim=0)
    return float(torch.linalg.vector_norm(per_term) / norm)
