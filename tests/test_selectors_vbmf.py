"""EVBMF: rank recovery on synthetic matrices, the analytic threshold, and the floor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.plugins.selectors.vbmf import evb_tau_bar, evb_threshold, evbmf
from rankopt.compression.spectral import SpectralCache


def _spectrum(matrix: np.ndarray) -> np.ndarray:
    # LAPACK is fastest on the tall orientation
    return np.linalg.svd(np.ascontiguousarray(matrix.T), compute_uv=False)


def _low_rank_plus_noise(rows: int, cols: int, rank: int, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
    return signal + sigma * rng.standard_normal((rows, cols))


@pytest.mark.parametrize("sigma", [0.1, 1.0, 4.0])
def test_evbmf_recovers_true_rank_of_conv_unfolding_shape(sigma: float) -> None:
    # 256 x 2304 is the mode unfolding of a 256-channel 3x3 conv
    y = _low_rank_plus_noise(256, 2304, 40, sigma, seed=int(sigma * 10))
    result = evbmf(_spectrum(y), y.shape)
    assert result.rank == 40
    assert result.sigma2 == pytest.approx(sigma**2, rel=0.03)
    # the transpose is the same problem
    assert evbmf(_spectrum(y), (2304, 256)).rank == 40


def test_evbmf_returns_zero_components_on_pure_noise_like_the_analytic_threshold() -> None:
    rng = np.random.default_rng(7)
    for rows, cols, sigma in [(256, 2304, 1.0), (64, 576, 0.05), (128, 128, 3.0)]:
        s = _spectrum(sigma * rng.standard_normal((rows, cols)))
        result = evbmf(s, (rows, cols))
        assert result.rank == 0
        # the paper's threshold with the true noise variance keeps nothing either
        assert int(np.sum(s > evb_threshold((rows, cols), sigma**2))) == 0
        # and the estimated threshold is the analytic formula at the estimated variance
        assert result.threshold == pytest.approx(evb_threshold((rows, cols), result.sigma2))
        assert result.sigma2 == pytest.approx(sigma**2, rel=0.05)


def test_evbmf_with_known_variance_keeps_exactly_the_values_above_the_threshold() -> None:
    y = _low_rank_plus_noise(96, 400, 12, 0.5, seed=3)
    s = _spectrum(y)
    for sigma2 in (0.01, 0.25, 4.0, 100.0):
        threshold = evb_threshold(y.shape, sigma2)
        result = evbmf(s, y.shape, sigma2=sigma2)
        assert result.rank == int(np.sum(s > threshold))
        # shrinkage: kept components shrink but stay positive
        assert np.all(result.shrunk > 0) and np.all(result.shrunk < s[: result.rank])


def test_tau_bar_is_the_zero_of_the_papers_function() -> None:
    assert evb_tau_bar(1.0) == pytest.approx(2.5129, abs=1e-4)  # the paper's constant at alpha = 1
    for alpha in (0.01, 0.1, 0.5, 1.0):
        tau = evb_tau_bar(alpha)
        assert math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau == pytest.approx(0.0, abs=1e-10)
        assert math.sqrt(alpha) < tau <= 2.5129 + 1e-4
        # the approximation 2.5129 sqrt(alpha) of the reference code is within 15 % of it
        assert tau == pytest.approx(2.5129 * math.sqrt(alpha), rel=0.15)


def _planted_tucker_conv(r_in: int, r_out: int, noise: float, seed: int = 0) -> nn.Conv2d:
    g = torch.Generator().manual_seed(seed)
    t, s = 64, 48
    core = torch.randn(r_out, r_in, 3, 3, generator=g, dtype=torch.float64)
    u_out = torch.linalg.qr(torch.randn(t, r_out, generator=g, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(s, r_in, generator=g, dtype=torch.float64))[0]
    w = torch.einsum("ab,bcij,dc->adij", u_out, core, u_in)
    w = w + noise * torch.randn(w.shape, generator=g, dtype=torch.float64)
    conv = nn.Conv2d(s, t, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(w)
    return conv


def test_vbmf_selector_finds_planted_tucker2_ranks() -> None:
    conv = _planted_tucker_conv(r_in=12, r_out=9, noise=1e-3)
    ranks = rankopt.rank_selector("vbmf").select(conv, rankopt.decomposer("tucker2"), cache=SpectralCache())
    assert ranks == (12, 9)  # (r_in, r_out)


def test_vbmf_never_returns_zero_and_honours_the_floor() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3)  # random init: pure noise for EVBMF
    with torch.no_grad():
        conv.weight.normal_()
    sel, dec, cache = rankopt.rank_selector("vbmf"), rankopt.decomposer("tucker2"), SpectralCache()
    spectra = [np.asarray(cache.singular_values(m)) for m in dec.rank_matrices(conv.weight)]
    assert [evbmf(s, (32, 288)).rank for s in spectra] == [0, 0]
    assert sel.select(conv, dec, cache=cache) == (1, 1)
    assert sel.select(conv, dec, cache=cache, min_rank=5) == (5, 5)


def test_vbmf_weakening_moves_ranks_towards_full() -> None:
    conv = _planted_tucker_conv(r_in=12, r_out=9, noise=1e-3)
    sel, dec, cache = rankopt.rank_selector("vbmf"), rankopt.decomposer("tucker2"), SpectralCache()
    assert sel.select(conv, dec, cache=cache, weakening=1.0) == dec.max_ranks(conv) == (48, 64)
    # r = r_vbmf + ceil(w * (full - r_vbmf))
    assert sel.select(conv, dec, cache=cache, weakening=0.5) == (12 + 18, 9 + 28)
    previous = (0, 0)
    for w in np.linspace(0, 1, 6):
        ranks = sel.select(conv, dec, cache=cache, weakening=float(w))
        assert all(a >= b for a, b in zip(ranks, previous))
        previous = ranks
