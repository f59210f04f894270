"""Energy, approximation-ratio and fixed selectors; parameter validation; the contract."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from optuna.distributions import FloatDistribution

import rankopt
from rankopt.compression.accounting import Cost
from rankopt.core.errors import ConfigError
from rankopt.contract.decomposer import Decomposer
from rankopt.plugins.selectors._spectra import energy_rank
from rankopt.compression.selection import select_spec, selector_search_space
from rankopt.compression.spectral import SpectralCache
from rankopt.testing.selectors import check_rank_selector

# a hand-made spectrum and its cumulative energies
SPECTRUM = np.array([40.0, 25.0, 15.0, 10.0, 5.0, 3.0, 1.0, 1.0])
# linear: cum = .40 .65 .80 .90 .95 .98 .99 1.0
LINEAR = {0.9: 4, 0.95: 5, 0.98: 6, 1.0: 8}
# squared (1600 625 225 100 25 9 1 1 of 2586): cum = .619 .860 .947 .986 .996 .9992 .9996 1.0
SQUARED = {0.9: 3, 0.95: 4, 0.98: 4, 1.0: 8}


def _linear_with_spectrum(s: np.ndarray, rows: int = 12, cols: int = 10, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, s.size, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(cols, s.size, generator=g, dtype=torch.float64))[0]
    lin = nn.Linear(cols, rows, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(u @ torch.diag(torch.from_numpy(s)) @ v.T)
    return lin


def _conv(s: int = 16, t: int = 24, k: int = 3, seed: int = 0) -> nn.Conv2d:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        conv = nn.Conv2d(s, t, k, padding=k // 2)
        # a decaying spectrum, like trained layers have
        with torch.no_grad():
            w = conv.weight.reshape(t, -1)
            u, _, vh = torch.linalg.svd(torch.randn_like(w), full_matrices=False)
            conv.weight.copy_((u @ torch.diag(0.8 ** torch.arange(min(w.shape)).float()) @ vh).reshape_as(conv.weight))
    return conv


@pytest.mark.parametrize("energy,expected", [("linear", LINEAR), ("squared", SQUARED)])
def test_energy_ranks_are_exact_on_hand_made_spectra(energy: str, expected: dict[float, int]) -> None:
    for p, rank in expected.items():
        assert energy_rank(SPECTRUM, p, energy) == rank
    # through the selector, on a weight with exactly this spectrum (svd decomposer)
    layer, sel, dec = _linear_with_spectrum(SPECTRUM), rankopt.rank_selector("energy"), rankopt.decomposer("svd")
    for p, rank in expected.items():
        assert sel.select(layer, dec, cache=SpectralCache(), p=p, energy=energy) == (rank,)


def test_energy_on_tucker2_uses_each_mode_unfolding() -> None:
    conv, dec = _conv(), rankopt.decomposer("tucker2")
    w = conv.weight.detach().double().numpy()
    mode1 = np.linalg.svd(w.transpose(1, 0, 2, 3).reshape(16, -1), compute_uv=False)  # input channels
    mode0 = np.linalg.svd(w.reshape(24, -1), compute_uv=False)  # output channels
    for p in (0.5, 0.8, 0.9, 0.99):
        expected = (energy_rank(mode1, p), energy_rank(mode0, p))
        assert rankopt.rank_selector("energy").select(conv, dec, p=p, cache=SpectralCache()) == expected


def test_energy_and_approx_ratio_are_monotone_in_their_parameter() -> None:
    conv, dec, cache = _conv(), rankopt.decomposer("tucker2"), SpectralCache()
    energy, ratio = rankopt.rank_selector("energy"), rankopt.rank_selector("approx_ratio")
    grid = np.linspace(0.05, 1.0, 40)

    def nondecreasing(seq: list[tuple[int, ...]]) -> bool:
        return all(all(a <= b for a, b in zip(x, y)) for x, y in zip(seq, seq[1:]))

    for kind in ("squared", "linear"):
        assert nondecreasing([energy.select(conv, dec, cache=cache, p=float(p), energy=kind) for p in grid])
    assert nondecreasing([ratio.select(conv, dec, cache=cache, ratio=float(r)) for r in grid])
    errors = [ratio.select(conv, dec, cache=cache, error=float(e)) for e in grid[:-1]]
    assert nondecreasing(errors[::-1])
    assert energy.select(conv, dec, cache=cache, p=1.0) == dec.max_ranks(conv)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_approx_ratio_spectral_meets_its_target_on_the_reconstruction(target: float) -> None:
    conv, sel, cache = _conv(), rankopt.rank_selector("approx_ratio"), SpectralCache()
    w = conv.weight.detach().double()
    for name in ("tucker2", "svd"):
        dec = rankopt.decomposer(name)
        ranks = sel.select(conv, dec, cache=cache, ratio=target)
        approx = dec.project(w, ranks).double()
        assert torch.linalg.vector_norm(approx) / torch.linalg.vector_norm(w) >= target - 1e-9
        err_ranks = sel.select(conv, dec, cache=cache, error=target / 2)
        err = torch.linalg.vector_norm(w - dec.project(w, err_ranks).double()) / torch.linalg.vector_norm(w)
        assert err <= target / 2 + 1e-9
    # SVD is a single matrix: the ranks are the smallest that meet the target
    dec = rankopt.decomposer("svd")
    (r,) = sel.select(conv, dec, cache=cache, ratio=target)
    if r > 1:
        smaller = dec.project(w, (r - 1,)).double()
        assert torch.linalg.vector_norm(smaller) / torch.linalg.vector_norm(w) < target


def test_approx_ratio_project_method_is_exact_and_no_larger_than_spectral() -> None:
    conv, sel, dec, cache = _conv(), rankopt.rank_selector("approx_ratio"), rankopt.decomposer("tucker2"), SpectralCache()
    w = conv.weight.detach().double()
    for target in (0.6, 0.9):
        spectral = sel.select(conv, dec, cache=cache, ratio=target)
        measured = sel.select(conv, dec, cache=cache, ratio=target, method="project")
        assert all(m <= s for m, s in zip(measured, spectral))
        ratio = torch.linalg.vector_norm(dec.project(w, measured).double()) / torch.linalg.vector_norm(w)
        assert ratio >= target - 1e-9


def test_fixed_fractions_overrides_and_explicit_ranks() -> None:
    net = nn.Sequential()
    net.add_module("stem", _conv(8, 16))
    block = nn.Sequential()
    block.add_module("a", _conv(16, 32))
    block.add_module("b", _conv(32, 30))
    net.add_module("block", block)
    layers = rankopt.find_layers(net, (1, 8, 8, 8))
    decs = {la.name: "tucker2" for la in layers}
    params = {
        "fraction": 0.3,
        "fractions": {"block.*": 0.5, "block.b": 0.1},
        "ranks": {"stem": [2, 3]},
    }
    spec, choices = select_spec(net, layers, decs, "fixed", params, cache=SpectralCache())
    got = {c.name: c.ranks for c in choices}
    # exact names win over patterns; fractions round up
    assert got == {"stem": (2, 3), "block.a": (8, 16), "block.b": (4, 3)}
    assert spec["block.b"] == {"decomposer": "tucker2", "ranks": [4, 3]}
    # default fraction, and ceil: 0.3 * 16 = 4.8 -> 5, 0.3 * 32 = 9.6 -> 10
    sel, dec = rankopt.rank_selector("fixed"), rankopt.decomposer("tucker2")
    assert sel.select(net.block.a, dec, fraction=0.3) == (5, 10)
    assert sel.select(net.block.a, dec, fraction=0.1 * 3) == (5, 10)
    # explicit ranks are clamped to [min_rank, largest]
    assert sel.select(net.stem, dec, name="stem", ranks={"stem": [100, 1]}, min_rank=2) == (8, 2)
    with pytest.raises(ConfigError, match=r"ranks\['stem'\].*must have 2 entries"):
        sel.select(net.stem, dec, name="stem", ranks={"stem": [4]})


def test_fixed_search_space_one_fraction_or_one_per_layer() -> None:
    net = nn.Sequential(_conv(4, 8), _conv(8, 8))
    layers = rankopt.find_layers(net, (1, 4, 6, 6))
    assert set(selector_search_space("fixed", layers)) == {"fraction"}
    space = selector_search_space("fixed", layers, per_layer=True)
    assert set(space) == {"fraction:0", "fraction:1"}
    assert all(isinstance(d, FloatDistribution) for d in space.values())
    # sampled flat names are accepted back, per layer
    sel = rankopt.rank_selector("fixed")
    checked = sel.validate_params({"fraction:0": 0.25, "fraction:1": 1.0})
    assert checked["fractions"] == {"0": 0.25, "1": 1.0}
    assert sel.validate_params(checked) == checked
    _, choices = select_spec(net, layers, {"0": "tucker2", "1": "tucker2"}, "fixed",
                             {"fraction:0": 0.25, "fraction:1": 1.0})
    assert [c.ranks for c in choices] == [(1, 2), None]  # full ranks would not be smaller
    assert "not fewer than the original" in choices[1].reason
    with pytest.raises(ConfigError, match="unknown search-space option"):
        selector_search_space("energy", layers, per_layer=True)


@pytest.mark.parametrize(
    "selector,params,needles",
    [
        ("energy", {"p": 1.5}, ["'p'", "1.5", "(0, 1]"]),
        ("energy", {"p": 0.0}, ["'p'", "0.0", "(0, 1]"]),
        ("energy", {"p": -0.2}, ["'p'", "-0.2", "(0, 1]"]),
        ("energy", {"energy": "cubic"}, ["'energy'", "cubic", "'squared', 'linear'"]),
        ("energy", {"threshold": 0.9}, ["unknown parameter 'threshold'", "'p'", "'energy'"]),
        ("fixed", {"fraction": -0.5}, ["'fraction'", "-0.5", "(0, 1]"]),
        ("fixed", {"fractions": {"layer4.*": -0.25}}, ["fractions['layer4.*']", "-0.25", "(0, 1]"]),
        ("fixed", {"ranks": {"x": [0, 4]}}, ["ranks['x']", ">= 1"]),
        ("vbmf", {"weakening": 2}, ["'weakening'", "2", "[0, 1]"]),
        ("vbmf", {"min_rank": 0}, ["'min_rank'", "0", "[1, inf)"]),
        ("approx_ratio", {"ratio": 0.9, "error": 0.1}, ["either 'ratio'", "'error'"]),
        ("approx_ratio", {"error": 1.0}, ["'error'", "[0, 1)"]),
        ("budget", {"target": 0}, ["'target'", "(0, 1]"]),
        ("budget", {"measure": "bytes"}, ["'measure'", "'params', 'flops'"]),
    ],
)
def test_bad_params_fail_naming_parameter_value_and_range(
    selector: str, params: dict[str, Any], needles: list[str]
) -> None:
    sel = rankopt.rank_selector(selector)
    with pytest.raises(ConfigError) as info:
        sel.validate_params(params)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    # select_spec checks before any work: no SVD happens
    net = nn.Sequential(_conv(4, 8))
    cache = SpectralCache()
    with pytest.raises(ConfigError):
        select_spec(net, rankopt.find_layers(net, (1, 4, 6, 6)), {"0": "tucker2"}, selector, params, cache=cache)
    assert cache.svd_calls == 0


def test_select_spec_reports_unsupported_layers_and_unknown_names() -> None:
    net = nn.Sequential(_conv(4, 8), nn.Flatten(), nn.Linear(8 * 36, 10))
    layers = rankopt.find_layers(net, (1, 4, 6, 6))
    spec, choices = select_spec(net, layers, {"0": "tucker2", "2": "tucker2"}, "energy", {"p": 0.5})
    assert set(spec) == {"0"}
    assert choices[1].ranks is None and "Linear is not supported" in choices[1].reason
    assert choices[0].cost is not None and choices[0].cost.params < choices[0].original_cost.params
    with pytest.raises(ConfigError, match="not among the target layers"):
        select_spec(net, layers, {"nope": "tucker2"}, "energy", {})
    with pytest.raises(ConfigError, match="unknown rank selector 'nope'"):
        select_spec(net, layers, {"0": "tucker2"}, "nope", {})


class _HalfMatrixDecomposer(Decomposer):
    """A third-party decomposer: one rank, governed by the weight reshaped T x (S k k)."""

    name = "half_matrix"
    rank_names = ("r",)

    def max_ranks(self, module: nn.Module, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        return (min(module.out_channels, module.in_channels * 9),)

    def cost(self, module: nn.Module, ranks: Sequence[int], input_hw: Sequence[int] | None = None,
             options: Mapping[str, Any] | None = None) -> Cost:
        return Cost(ranks[0] * (module.out_channels + module.in_channels * 9), 0)

    def build(self, module: nn.Module, ranks: Sequence[int], *, options: Any = None, initialize: bool = True) -> nn.Module:
        raise NotImplementedError

    def project(self, weight: torch.Tensor, ranks: Sequence[int], options: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def rank_matrices(self, weight: torch.Tensor, options: Any = None) -> list[torch.Tensor]:
        return [weight.reshape(weight.shape[0], -1)]


def test_selectors_work_for_a_third_party_decomposer() -> None:
    conv, dec = _conv(16, 24), _HalfMatrixDecomposer()
    s = np.linalg.svd(conv.weight.detach().double().reshape(24, -1).numpy(), compute_uv=False)
    assert rankopt.rank_selector("energy").select(conv, dec, p=0.9) == (energy_rank(s, 0.9),)
    for name in ("vbmf", "approx_ratio", "fixed"):
        (r,) = rankopt.rank_selector(name).select(conv, dec)
        assert 1 <= r <= 24


@pytest.mark.filterwarnings("ignore:rank selector 'budget'")  # its space reaches below a tiny model's floor
@pytest.mark.parametrize("name", ["energy", "vbmf", "approx_ratio", "fixed", "budget"])
def test_builtin_selectors_pass_the_contract_checks(name: str) -> None:
    results = check_rank_selector(rankopt.rank_selector(name))
    failed = [r for r in results if not r.passed]
    assert not failed, failed
