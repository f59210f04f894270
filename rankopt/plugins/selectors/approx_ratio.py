"""The approximation-ratio rank selector (the Tucker/CP study's "approximation ratio")."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from optuna.distributions import BaseDistribution, FloatDistribution
from pydantic import Field, model_validator

from rankopt.contract.hookspecs import hookimpl
from rankopt.contract.decomposer import Decomposer
from rankopt.plugins.selectors._spectra import (
    RELATIVE_TOLERANCE,
    MatrixSpectrum,
    SpectralRankSelector,
    layer_weight,
    tail_fractions,
)
from rankopt.contract.selector import SelectorParams
from rankopt.core.records import RankSelectorInfo
from rankopt.compression.surgery import LayerInfo

__all__ = ["ApproxRatioRankSelector", "ApproxRatioParams", "ranks_for_tail"]

DEFAULT_RATIO = 0.9


class ApproxRatioParams(SelectorParams):
    """Give ``ratio`` (the target ``||W_hat||_F / ||W||_F``, in (0, 1]; default 0.9) or
    ``error`` (the target relative error ``||W - W_hat||_F / ||W||_F``, in [0, 1)), not
    both. ``method``: ``"spectral"`` (default, from the cached spectra) or
    ``"project"`` (measured on ``decomposer.project``). ``min_rank``: the floor."""

    ratio: float | None = Field(None, gt=0.0, le=1.0)
    error: float | None = Field(None, ge=0.0, lt=1.0)
    method: Literal["spectral", "project"] = "spectral"
    min_rank: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _one_target(self) -> ApproxRatioParams:
        if self.ratio is not None and self.error is not None:
            raise ValueError(
                f"give either 'ratio' ({self.ratio}) or 'error' ({self.error}), not both; "
                "ratio = sqrt(1 - error^2) for orthogonal projections"
            )
        if self.ratio is None and self.error is None:
            object.__setattr__(self, "ratio", DEFAULT_RATIO)
        return self


def _allowed_error2(params: Mapping[str, Any]) -> float:
    """The allowed squared relative error of the whole weight."""
    if params.get("error") is not None:
        return float(params["error"]) ** 2
    return 1.0 - float(params["ratio"]) ** 2


def ranks_for_tail(spectra: Sequence[MatrixSpectrum], tail: float) -> list[int]:
    """Per matrix, the smallest rank whose discarded squared-energy fraction is <= ``tail``."""
    out = []
    for sp in spectra:
        t = tail_fractions(sp.singular_values)  # non-increasing in r
        ok = np.nonzero(t <= tail + RELATIVE_TOLERANCE)[0]
        out.append(int(ok[0]) if ok.size else sp.max_rank)
    return out


class ApproxRatioRankSelector(SpectralRankSelector):
    """The smallest ranks whose reconstruction keeps ``||W_hat|| / ||W|| >= ratio``.

    The approximation ratio is the definition of the Tucker/CP compression study
    (Frobenius norm of the reconstruction over that of the original);
    ``error`` asks for ``||W - W_hat|| / ||W|| <= error`` instead.

    ``method="spectral"`` splits the allowed squared error ``e^2`` (``1 - ratio^2``, or
    ``error^2``) evenly over the decomposer's n rank matrices and takes, per matrix,
    the smallest rank that discards at most ``e^2 / n`` of its energy. Since
    ``||W - W_hat||^2`` is at most the sum of the discarded energies for truncated
    HOSVD (Tucker-2; De Lathauwer et al. 2000) and for TT-SVD (Oseledets 2011,
    Thm 2.2), and exactly the discarded energy for a truncated SVD, the target is
    guaranteed for tucker2, tt and svd; for these orthogonal projections
    ``||W_hat||^2 = ||W||^2 - ||W - W_hat||^2``, so ratio and error are the same rule
    with ``ratio = sqrt(1 - error^2)``. For CP (not a projection) the rule is a
    heuristic on its channel unfoldings.

    ``method="project"`` measures the ratio (or error) of ``decomposer.project`` itself
    and bisects over the same family of per-matrix ranks for the smallest that meets
    the target: exact for any decomposer, at the price of about ten projections
    (each an SVD or a decomposition) per layer.

    Ranks grow with ``ratio`` and shrink with ``error``.
    """

    name = "approx_ratio"
    description = "Smallest ranks keeping ||W_hat||/||W|| >= ratio (or relative error <= error)"
    Params = ApproxRatioParams

    def matrix_rank(self, spectrum: MatrixSpectrum, params: Mapping[str, Any]) -> int:
        return ranks_for_tail([spectrum], _allowed_error2(params))[0]

    def matrix_ranks(
        self,
        spectra: Sequence[MatrixSpectrum],
        module: nn.Module,
        decomposer: Decomposer,
        options: Mapping[str, Any] | None,
        params: Mapping[str, Any],
    ) -> list[int]:
        budget = _allowed_error2(params)
        if params["method"] == "spectral":
            return ranks_for_tail(spectra, budget / max(1, len(spectra)))
        return self._bisect_projection(spectra, module, decomposer, options, params)

    def _bisect_projection(
        self,
        spectra: Sequence[MatrixSpectrum],
        module: nn.Module,
        decomposer: Decomposer,
        options: Mapping[str, Any] | None,
        params: Mapping[str, Any],
    ) -> list[int]:
        weight = layer_weight(module).detach()
        w64 = weight.double()
        norm = float(torch.linalg.vector_norm(w64))
        if norm == 0.0:
            return [1] * len(spectra)
        floor = params["min_rank"]

        def meets(matrix_ranks: list[int]) -> bool:
            ranks = self.finish(module, decomposer, matrix_ranks, options, floor)
            approx = decomposer.project(weight, ranks, options or None).double()
            if params.get("error") is not None:
                err = float(torch.linalg.vector_norm(w64 - approx)) / norm
                return err <= params["error"] + 1e-12
            return float(torch.linalg.vector_norm(approx)) / norm >= params["ratio"] - 1e-12

        # candidate per-matrix tail levels, largest first (= smallest ranks first)
        levels = np.unique(np.concatenate([tail_fractions(sp.singular_values) for sp in spectra]))[::-1]
        candidates: list[list[int]] = []
        for level in levels:
            r = ranks_for_tail(spectra, float(level))
            if not candidates or r != candidates[-1]:
                candidates.append(r)
        lo, hi = 0, len(candidates) - 1  # find the first candidate that meets the target
        if not meets(candidates[hi]):
            return candidates[hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if meets(candidates[mid]):
                hi = mid
            else:
                lo = mid + 1
        return candidates[lo]

    def search_space(self, layers: Sequence[LayerInfo] = (), **options: Any) -> dict[str, BaseDistribution]:
        self._reject_space_options(options, ())
        return {"ratio": FloatDistribution(0.5, 0.99)}


@hookimpl
def rankopt_rank_selectors() -> list[RankSelectorInfo]:
    return [
        RankSelectorInfo("approx_ratio", ApproxRatioRankSelector, ApproxRatioRankSelector.description)
    ]
