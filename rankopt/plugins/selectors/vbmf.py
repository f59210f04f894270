"""Empirical Variational Bayesian Matrix Factorization (EVBMF) rank selection.

Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed
variational Bayesian matrix factorization", JMLR 14 (2013), with the unknown noise
variance estimated as in Nakajima et al., "Perfect dimensionality recovery by
variational Bayesian PCA", NIPS 2012. For an L x M matrix (L <= M, alpha = L / M)
with singular values gamma_h:

* ``tau_bar`` is the zero of ``log(tau + 1) + alpha * log(tau / alpha + 1) - tau``
  (about 2.5129 * sqrt(alpha); solved exactly here) and
  ``x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)``;
* the noise variance sigma^2 minimizes the free energy
  ``sum_h psi0(x_h) + [x_h > x_bar] psi1(x_h)`` with ``x_h = gamma_h^2 / (M sigma^2)``,
  ``psi0(x) = x - log x``, ``psi1(x) = log(tau(x) + 1) + alpha * log(tau(x) / alpha + 1) - tau(x)``
  and ``tau(x) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2``, over the
  paper's interval ``[sigma_lo^2, sum gamma^2 / (L M)]``;
* the components kept are those above the analytic threshold
  ``gamma_evb = sqrt(M sigma^2 x_bar)``, shrunk to
  ``gamma_h / 2 * (1 - (L+M) sigma^2 / gamma_h^2 + sqrt((1 - (L+M) sigma^2 / gamma_h^2)^2
  - 4 L M sigma^4 / gamma_h^4))``.

Written here with numpy/scipy because no maintained package provides EVBMF (the
widely copied ``VBMF.py`` of CasvandenBogaard, used by pytorch-tensor-decompositions and
MUSCO, is an unpackaged script). Differences from it: tau_bar is solved exactly rather
than approximated by 2.5129 sqrt(alpha); the free energy drops its sigma-independent
``log gamma^2`` terms, so exactly-zero singular values do not make it infinite; and the
one-dimensional minimization starts from a log-spaced grid before scipy's bounded Brent
search, since the free energy may have several local minima.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.distributions import BaseDistribution, FloatDistribution
from pydantic import Field
from scipy.optimize import brentq, minimize_scalar

from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.selectors._spectra import MatrixSpectrum, SpectralRankSelector
from rankopt.contract.selector import SelectorParams, ceil_fraction
from rankopt.core.records import RankSelectorInfo
from rankopt.compression.surgery import LayerInfo

__all__ = ["VBMFRankSelector", "VBMFParams", "EVBMFResult", "evbmf", "evb_tau_bar", "evb_threshold"]


@functools.lru_cache(maxsize=1024)
def evb_tau_bar(alpha: float) -> float:
    """The zero of ``log(tau + 1) + alpha log(tau / alpha + 1) - tau`` for 0 < alpha <= 1."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha = L / M must be in (0, 1], got {alpha}")

    def psi(tau: float) -> float:
        return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau

    return float(brentq(psi, 1e-9, 100.0, xtol=1e-14, rtol=1e-12))


def evb_threshold(shape: tuple[int, int], sigma2: float) -> float:
    """The EVB truncation threshold ``sqrt(M sigma^2 x_bar)`` on singular values."""
    big, small = max(shape), min(shape)
    alpha = small / big
    tau = evb_tau_bar(alpha)
    return math.sqrt(big * sigma2 * (1.0 + tau) * (1.0 + alpha / tau))


@dataclass(frozen=True)
class EVBMFResult:
    """The EVBMF estimate: ``rank`` signal components, the noise variance, the
    threshold they cleared and their shrunk singular values."""

    rank: int
    sigma2: float
    threshold: float
    shrunk: np.ndarray


def _free_energy(sigma2: float, s2: np.ndarray, big: int, alpha: float, x_bar: float) -> float:
    x = s2 / (big * sigma2)
    # psi0(x) = x - log x; log x = log gamma^2 - log(M sigma^2), the first term is a constant
    value = float(x.sum()) + x.size * math.log(big * sigma2)
    z = x[x > x_bar]
    if z.size:
        tau = 0.5 * (z - (1.0 + alpha) + np.sqrt((z - (1.0 + alpha)) ** 2 - 4.0 * alpha))
        value += float(np.sum(np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau))
    return value


def _estimate_sigma2(s: np.ndarray, small: int, big: int, alpha: float, x_bar: float) -> float:
    s2 = s * s
    upper = float(s2.sum()) / (small * big)
    e_h = min(math.ceil(small / (1.0 + alpha)) - 1, small)  # the paper's bar-H
    lower = max(float(s2[e_h]) / (big * x_bar), float(s2[e_h:].mean()) / big) if e_h < small else 0.0
    if not lower < upper:
        return upper
    grid = np.geomspace(max(lower, upper * 1e-12), upper, 64)
    values = [_free_energy(g, s2, big, alpha, x_bar) for g in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    if hi <= lo:
        return float(grid[i])
    res = minimize_scalar(
        _free_energy, bounds=(lo, hi), args=(s2, big, alpha, x_bar), method="bounded",
        options={"xatol": 1e-12 * hi},
    )
    return float(res.x) if res.fun <= values[i] else float(grid[i])


def evbmf(
    singular_values: np.ndarray | Sequence[float], shape: tuple[int, int], sigma2: float | None = None
) -> EVBMFResult:
    """EVBMF of a matrix of ``shape`` from its singular values (all min(shape) of them).

    ``sigma2``: the noise variance if known; estimated by minimizing the free energy
    otherwise. The rank may be 0 (pure noise); callers apply their own floor.
    """
    small, big = min(shape), max(shape)
    s = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1]
    if s.size < small:  # a thin SVD of a rank-deficient factor: the rest are zeros
        s = np.concatenate([s, np.zeros(small - s.size)])
    s = s[:small]
    if small == 0 or not np.any(s > 0):
        return EVBMFResult(0, 0.0, 0.0, np.zeros(0))
    alpha = small / big
    tau = evb_tau_bar(alpha)
    x_bar = (1.0 + tau) * (1.0 + alpha / tau)
    if sigma2 is None:
        sigma2 = _estimate_sigma2(s, small, big, alpha, x_bar)
    threshold = math.sqrt(big * sigma2 * x_bar)
    kept = s[s > threshold]
    ratio = (small + big) * sigma2 / kept**2
    disc = np.clip((1.0 - ratio) ** 2 - 4.0 * small * big * sigma2**2 / kept**4, 0.0, None)
    shrunk = kept / 2.0 * (1.0 - ratio + np.sqrt(disc))
    return EVBMFResult(int(kept.size), float(sigma2), float(threshold), shrunk)


class VBMFParams(SelectorParams):
    """``weakening`` in [0, 1]: 0 keeps the EVBMF ranks, 1 the full ranks, in between
    ``r = r_vbmf + ceil(weakening * (full - r_vbmf))`` (MUSCO's ``vbmf_weakenen_factor``
    is ``1 - weakening``); ``min_rank``: the floor (EVBMF finds rank 0 on noise-like
    layers, e.g. at random initialization; MUSCO then keeps the full rank, here the
    floor applies)."""

    weakening: float = Field(0.0, ge=0.0, le=1.0)
    min_rank: int = Field(1, ge=1)


class VBMFRankSelector(SpectralRankSelector):
    """EVBMF (unknown noise variance) on each rank matrix of the decomposer.

    Tucker-2: the mode-1 (input channels) and mode-0 (output channels) unfoldings of
    the kernel, as in pytorch-tensor-decompositions, MUSCO and NRMF's VBMF baseline.
    SVD: the weight matrix. CP: EVBMF on both channel unfoldings, folded into one R
    by the CP decomposer's ``ranks_from_matrix_ranks``. TT: EVBMF on each bond
    unfolding, giving one TT rank per bond. The rank is never below ``min_rank``.
    """

    name = "vbmf"
    description = "Empirical VBMF (Nakajima et al. 2013) on the mode unfoldings, unknown noise variance"
    Params = VBMFParams

    def matrix_rank(self, spectrum: MatrixSpectrum, params: Mapping[str, Any]) -> int:
        rank = evbmf(spectrum.singular_values, spectrum.shape).rank
        full = spectrum.max_rank
        return rank + ceil_fraction(params["weakening"], full - rank)

    def search_space(self, layers: Sequence[LayerInfo] = (), **options: Any) -> dict[str, BaseDistribution]:
        self._reject_space_options(options, ())
        return {"weakening": FloatDistribution(0.0, 0.9)}


@hookimpl
def rankopt_rank_selectors() -> list[RankSelectorInfo]:
    return [RankSelectorInfo("vbmf", VBMFRankSelector, VBMFRankSelector.description)]
