"""Sequential calibration (rankopt.compression.sequential): exact at full rank, lower final
output error than independent data-aware truncation (itself lower than plain) when errors
compound, the option validated, and a study's trials compressing sequentially."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.compression.calibration import calibrate, detach_statistics, input_statistics
from rankopt.compression.calibration_images import attach_images, detach_images, sequential_plan
from rankopt.compression.sequential import paired_moments, regression_stand_in
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError
from reliability_support import tiny_study


def _planted(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose mixed directions carry energies over three orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) * torch.logspace(1, -2, dim,
            dtype=torch.float64)) @ basis.T


def _two_layer(dim: int = 24, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)).double()


def _conv_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(12, 6, 3, padding=1, bias=False)).double()


def _error(reference: nn.Module, approx: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((reference(x) - approx(x)).pow(2).sum())


def _three_ways(net: nn.Module, spec: dict, x: torch.Tensor) -> tuple[float, float, float]:
    plain = rankopt.compress(net, spec)
    aware = copy.deepcopy(net)
    calibrate(aware, [x], list(spec), images=x.shape[0], damping=1e-6)
    independent = rankopt.compress(aware, spec)
    attach_images(aware, x, 1e-6)
    sequential = rankopt.compress(aware, spec)
    return _error(net, plain, x), _error(net, independent, x), _error(net, sequential, x)


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 6, 8, 12, 16, 20])
def test_sequential_beats_independent_beats_plain_on_a_two_layer_net(rank):
    net, x = _two_layer(), _planted(512, 24)
    spec = {n: {"decomposer": "svd", "ranks": [rank]} for n in ("0", "2")}
    plain, independent, sequential = _three_ways(net, spec, x)
    assert sequential < independent < plain


# The two-layer net is the guaranteed case: its last layer's error is what the regression
# minimises. Through ReLUs the layer-by-layer fit is greedy; at rank 1 (every layer's output
# almost lost) it ties with independent within 0.3%, so the stack is checked from rank 2 up.
@pytest.mark.parametrize("rank", [2, 4, 6, 8, 10])
def test_sequential_tucker2_lowers_the_final_error_of_a_conv_stack(rank):
    net = _conv_net()
    x = _planted(64 * 36, 6, seed=3).reshape(64, 6, 6, 6).permute(0, 3, 1, 2).contiguous()
    tucker2 = rankopt.decomposer("tucker2")
    spec = {n: {"decomposer": "tucker2", "ranks": [min(rank, hi) for hi in tucker2.max_ranks(net.get_submodule(n))]}
            for n in ("0", "2", "4")}
    plain, independent, sequential = _three_ways(net, spec, x)
    assert sequential < independent < plain


@pytest.mark.parametrize("decs", ["svd", "tucker2", "cp_free"])
def test_sequential_is_exact_at_full_rank(decs):
    net = _conv_net()
    net[4] = nn.Conv2d(12, 6, 3, padding=1).double()  # a bias too: the intercept path
    x = _planted(32 * 36, 6, seed=1).reshape(32, 6, 6, 6).permute(0, 3, 1, 2).contiguous()
    aware = copy.deepcopy(net)
    calibrate(aware, [x], ["0", "2", "4"], images=32, mode="sequential")
    if decs == "cp_free":  # a weight-space decomposer goes through unchanged (tt, full rank)
        spec = {"2": {"decomposer": "svd", "ranks": [12]}}
    else:
        spec = {n: {"decomposer": decs, "ranks": list(rankopt.decomposer(decs).max_ranks(net.get_submodule(n)))}
                for n in ("0", "2", "4")}
    got = rankopt.compress(aware, spec)
    with torch.no_grad():
        torch.testing.assert_close(got(x), net(x), rtol=1e-8, atol=1e-8)


def test_the_first_target_sees_the_reference_inputs_so_its_regression_is_its_weight():
    net, x = _two_layer(), _planted(256, 24)
    moments = paired_moments(net, copy.deepcopy(net), "0", ["channel"], x)
    stand_in = regression_stand_in(net[0], "channel", moments, damping=0.01)
    torch.testing.assert_close(stand_in.weight, net[0].weight, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stand_in.bias, net[0].bias, rtol=1e-10, atol=1e-10)


def test_calibrate_sequential_makes_compress_fit_in_forward_order():
    net, x = _two_layer(), _planted(512, 24)
    spec = {n: {"decomposer": "svd", "ranks": [4]} for n in ("0", "2")}
    independent = copy.deepcopy(net)
    calibrate(independent, [x], ["0", "2"], images=512)
    sequential = copy.deepcopy(net)
    calibrate(sequential, [x], ["0", "2"], images=512, mode="sequential")
    assert sequential_plan(independent) is None
    assert torch.equal(sequential_plan(sequential)[0], x)
    by_sequential = rankopt.compress(sequential, spec)
    assert _error(net, by_sequential, x) < _error(net, rankopt.compress(independent, spec), x)
    assert sequential_plan(by_sequential) is None  # the compressed model does not carry the images
    assert sequential_plan(sequential) is not None  # and the calibrated one still does
    detach_images(sequential)  # back to independent: the same model as the independent one
    with torch.no_grad():
        torch.testing.assert_close(rankopt.compress(sequential, spec)(x), rankopt.compress(independent, spec)(x))
    detach_statistics(sequential)
    assert sequential_plan(sequential) is None


def test_mode_is_validated_with_the_allowed_values():
    net, x = _two_layer(), _planted(64, 24)
    with pytest.raises(ConfigError, match=r"calibration mode must be one of \['independent', 'sequential'\], got 'seq'"):
        calibrate(net, [x], ["0"], images=64, mode="seq")
    with pytest.raises(rankopt.ConfigError, match=r"calibration.mode[\s\S]*'independent'[\s\S]*'sequential'"):
        load_config({"name": "x", "model": {"name": "lenet5"}, "calibration": {"mode": "forward"}},
                    check_plugins=False, check_paths=False)
    with pytest.raises(ConfigError, match=r"calibration ridge must be a number in \(0, 10\], got 0"):
        calibrate(net, [x], ["0"], images=64, mode="sequential", ridge=0)
    with pytest.raises(rankopt.ConfigError, match="calibration.ridge"):
        load_config({"name": "x", "model": {"name": "lenet5"}, "calibration": {"ridge": -1}},
                    check_plugins=False, check_paths=False)
    assert sequential_plan(net) is None and input_statistics(net[0]) is None  # refused before any work


def test_sequential_studies_compress_sequentially_and_the_default_is_independent(tmp_path, monkeypatch):
    import rankopt.compression.sequential as sequential

    calls = []
    real = sequential.fit_in_forward_order

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential, "fit_in_forward_order", counting)
    cfg = tiny_study(trials=1, device="cpu", multi_fidelity=None, calibration={"images": 32, "mode": "sequential"})
    assert load_config(tiny_study(trials=1)).calibration.mode == "independent"
    rankopt.run_study(cfg, run_dir=str(tmp_path / "seq"))
    assert calls, "the trial did not compress sequentially"
    calls.clear()
    rankopt.run_study({**cfg, "calibration": {"images": 32, "mode": "independent"}},
                      run_dir=str(tmp_path / "ind"))
    assert not calls
    # both modes share one statistics file per reference
    assert len(list((tmp_path / "ind" / "cache" / "calibration").glob("*.pt"))) == 1
