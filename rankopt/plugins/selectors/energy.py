"""The energy-threshold rank selector (NRMF's threshold p on singular values)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from optuna.distributions import BaseDistribution, FloatDistribution
from pydantic import Field

from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.selectors._spectra import MatrixSpectrum, SpectralRankSelector, energy_rank
from rankopt.contract.selector import SelectorParams
from rankopt.core.records import RankSelectorInfo
from rankopt.compression.surgery import LayerInfo

__all__ = ["EnergyRankSelector", "EnergyParams"]


class EnergyParams(SelectorParams):
    """``p``: the share of energy to keep, in (0, 1]; ``energy``: ``"squared"``
    (sum of squared singular values, the Frobenius energy; default) or ``"linear"``
    (sum of singular values, the nuclear norm NRMF regularizes); ``min_rank``: the
    floor of every rank."""

    p: float = Field(0.95, gt=0.0, le=1.0)
    energy: Literal["squared", "linear"] = "squared"
    min_rank: int = Field(1, ge=1)


class EnergyRankSelector(SpectralRankSelector):
    """Per rank matrix, the smallest rank whose retained energy reaches ``p``.

    For Tucker-2 the matrices are the mode-1 (input channels) and mode-0 (output
    channels) unfoldings of the kernel, giving ``(r_in, r_out)`` as in the NRMF layer
    table (S/R3, T/R4; NRMF uses p = 0.92, 0.95, 0.98). For SVD it is the weight
    matrix; for CP and TT the decomposer's ``rank_matrices`` (the channel unfoldings,
    the TT bond unfoldings) with CP folding the two ranks into one R. ``p = 1`` keeps
    the numerical rank (every non-zero singular value). Ranks grow monotonically
    with ``p``.
    """

    name = "energy"
    description = "Smallest ranks keeping a share p of the spectral energy per mode (NRMF threshold)"
    Params = EnergyParams

    def matrix_rank(self, spectrum: MatrixSpectrum, params: Mapping[str, Any]) -> int:
        return energy_rank(spectrum.singular_values, params["p"], params["energy"])

    def search_space(self, layers: Sequence[LayerInfo] = (), **options: Any) -> dict[str, BaseDistribution]:
        self._reject_space_options(options, ())
        # from 0.3: a wide layer keeps only a few ranks there (64x and beyond)
        return {"p": FloatDistribution(0.3, 0.995)}


@hookimpl
def rankopt_rank_selectors() -> list[RankSelectorInfo]:
    return [RankSelectorInfo("energy", EnergyRankSelector, EnergyRankSelector.description)]
