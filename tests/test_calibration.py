"""Data-aware decomposition (rankopt.compression.calibration): exact at full rank, lower output error
than weight-space truncation on anisotropic inputs, whitened spectra for the selectors,
and a study that collects the statistics once and shares them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rankopt
from rankopt.compression.calibration import (
    InputStatistics,
    attach_statistics,
    calibrate,
    collect_input_statistics,
    detach_statistics,
    input_statistics,
    load_statistics,
    save_statistics,
)
from rankopt.config.schema import load_config
from rankopt.plugins.selectors._spectra import energy_rank
from rankopt.compression.spectral import SpectralCache
from reliability_support import tiny_study


def _anisotropic(n: int, dim: int, *, seed: int = 0) -> torch.Tensor:
    """Inputs whose directions carry energies spread over four orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -2, dim, dtype=torch.float64)
    return (torch.randn(n, dim, generator=g, dtype=torch.float64) * scales) @ basis.T


def _linear(n_in: int = 24, n_out: int = 16, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).double()


def _image_inputs(n: int, channels: int, hw: int = 6, seed: int = 0) -> torch.Tensor:
    """Conv inputs whose channels are mixed and scaled anisotropically, per pixel."""
    flat = _anisotropic(n * hw * hw, channels, seed=seed)
    return flat.reshape(n, hw, hw, channels).permute(0, 3, 1, 2).contiguous()


def _stats_for(module: nn.Module, x: torch.Tensor, **kw) -> InputStatistics:
    model = nn.Sequential(module)
    stats = collect_input_statistics(model, ["0"], [x], images=x.shape[0], patch_layers=["0"], **kw)
    return stats["0"]


def _output_error(original: nn.Module, approx: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((original(x) - approx(x)).pow(2).sum())


# -- the statistics ---------------------------------------------------------------------------


def test_collected_moments_equal_the_hand_computed_second_moments():
    lin = _linear()
    x = _anisotropic(300, 24)
    s = _stats_for(lin, x)
    torch.testing.assert_close(s.channel, x.T @ x / 300, rtol=1e-5, atol=1e-8)
    assert s.samples == 300 and s.patch is None

    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    imgs = _image_inputs(5, 3)
    s = _stats_for(conv, imgs)
    pixels = imgs.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(s.channel, pixels.T @ pixels / pixels.shape[0], rtol=1e-5, atol=1e-8)
    cols = F.unfold(imgs, 3, padding=1).transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(s.patch, cols.T @ cols / cols.shape[0], rtol=1e-5, atol=1e-8)


def test_statistics_round_trip_and_a_damaged_file_is_a_miss(tmp_path):
    lin = _linear()
    s = _stats_for(lin, _anisotropic(50, 24))
    path = tmp_path / "c.pt"
    save_statistics(path, {"fc": s})
    back = load_statistics(path, ["fc"])
    torch.testing.assert_close(back["fc"].channel, s.channel)
    assert load_statistics(path, ["other"]) is None  # another model's layers
    bad = dict(s.__dict__)
    torch.save({"fc": {"channel": torch.full((24, 24), float("nan"), dtype=torch.float64),
                       "patch": None, "samples": 1, "damping": 0.01, "spectra": "output"}}, path)
    assert load_statistics(path, ["fc"]) is None  # non-finite entries are never trusted
    path.write_bytes(b"garbage")
    assert load_statistics(path, ["fc"]) is None
    assert bad  # the statistics object itself was not touched


# -- exact at full rank -------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["svd-linear", "svd-conv", "tucker2", "tucker2-hooi"])
def test_data_aware_decomposition_is_exact_at_full_rank(case):
    if case == "svd-linear":
        layer, x, dec, options = _linear(), _anisotropic(200, 24), "svd", None
    else:
        torch.manual_seed(2)
        layer = nn.Conv2d(6, 8, 3, padding=1).double()
        x, dec = _image_inputs(20, 6), ("svd" if case == "svd-conv" else "tucker2")
        options = {"init": "hooi"} if case == "tucker2-hooi" else None
    attach_statistics(nn.Sequential(layer), {"0": _stats_for(layer, x)})
    decomposer = rankopt.decomposer(dec)
    full = decomposer.max_ranks(layer)
    built = decomposer.build(layer, full, options=options)
    torch.testing.assert_close(built.reconstruct_weight(), layer.weight.detach(), rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(built(x if case == "svd-linear" else x), layer(x), rtol=1e-9, atol=1e-9)


# -- the output-error property ------------------------------------------------------------------


def test_data_aware_svd_has_lower_output_error_than_plain_at_every_rank():
    lin = _linear(32, 20)
    x = _anisotropic(400, 32, seed=3)
    dec = rankopt.decomposer("svd")
    plain_errors, aware_errors = [], []
    for r in range(1, 20):
        plain = dec.build(lin, (r,))
        aware_layer = copy.deepcopy(lin)
        attach_statistics(nn.Sequential(aware_layer), {"0": _stats_for(aware_layer, x)})
        aware = dec.build(aware_layer, (r,))
        plain_errors.append(_output_error(lin, plain, x))
        aware_errors.append(_output_error(lin, aware, x))
    assert all(a < p for a, p in zip(aware_errors, plain_errors)), (aware_errors, plain_errors)
    # and by a wide margin where the input's energy is concentrated
    assert aware_errors[4] < 0.5 * plain_errors[4]


@pytest.mark.parametrize("dec_name", ["svd", "tucker2"])
def test_data_aware_conv_truncation_has_lower_output_error_at_every_rank(dec_name):
    torch.manual_seed(4)
    conv = nn.Conv2d(12, 10, 3, padding=1).double()
    x = _image_inputs(30, 12, seed=5)
    dec = rankopt.decomposer(dec_name)
    aware_conv = copy.deepcopy(conv)
    attach_statistics(nn.Sequential(aware_conv), {"0": _stats_for(aware_conv, x)})
    full = dec.max_ranks(conv)
    for r in range(1, min(full)):
        ranks = (r,) if dec_name == "svd" else (r, full[1])  # Tucker-2: the input mode is whitened
        plain = _output_error(conv, dec.build(conv, ranks), x)
        aware = _output_error(conv, dec.build(aware_conv, ranks), x)
        assert aware < plain, (r, aware, plain)


def test_cp_starts_from_the_whitened_kernel_and_lowers_the_output_error():
    torch.manual_seed(6)
    conv = nn.Conv2d(8, 8, 3, padding=1).double()
    x = _image_inputs(20, 8, seed=7)
    dec = rankopt.decomposer("cp")
    aware_conv = copy.deepcopy(conv)
    attach_statistics(nn.Sequential(aware_conv), {"0": _stats_for(aware_conv, x)})
    wins = 0
    for r in (2, 4, 8):
        wins += _output_error(conv, dec.build(aware_conv, (r,)), x) < _output_error(conv, dec.build(conv, (r,)), x)
    assert wins == 3


# -- selectors read the output-energy spectrum ----------------------------------------------------


def test_energy_selector_reads_the_whitened_spectrum_and_weight_when_asked():
    lin = _linear(32, 20)
    x = _anisotropic(400, 32, seed=3)
    stats = _stats_for(lin, x)
    sel, dec = rankopt.rank_selector("energy"), rankopt.decomposer("svd")
    plain = sel.select(lin, dec, cache=SpectralCache(), p=0.9)
    attach_statistics(nn.Sequential(lin), {"0": stats})
    aware = sel.select(lin, dec, cache=SpectralCache(), p=0.9)
    lower, _ = stats.whitening("channel", centered=True)  # a Linear with a bias: about its mean
    s = torch.linalg.svdvals(lin.weight.detach() @ lower).numpy()
    assert aware == (energy_rank(s, 0.9),)
    assert aware != plain  # the two spectra give different ranks on these inputs
    stats.spectra = "weight"
    assert sel.select(lin, dec, cache=SpectralCache(), p=0.9) == plain
    detach_statistics(lin)
    assert input_statistics(lin) is None


def test_calibrate_attaches_to_every_layer_and_compress_uses_it():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    batches = [(torch.randn(16, 3, 6, 6), torch.zeros(16)) for _ in range(4)]
    stats = calibrate(model, batches, images=40)
    assert set(stats) == {"0", "3"} and stats["0"].samples == 40 * 36 and stats["3"].samples == 40
    spec = {"3": {"decomposer": "svd", "ranks": [4]}}
    small = rankopt.compress(model, spec)
    plain_model = copy.deepcopy(model)
    detach_statistics(plain_model)
    plain = rankopt.compress(plain_model, spec)
    w_aware, w_plain = small[3].reconstruct_weight(), plain[3].reconstruct_weight()
    assert not torch.allclose(w_aware, w_plain)  # the decomposition looked at the data
    assert input_statistics(model[3]) is stats["3"]  # compress leaves the original as it was


# -- the study ---------------------------------------------------------------------------------------


def test_a_study_collects_statistics_once_and_null_turns_it_off(tmp_path):
    cfg = tiny_study(trials=1, device="cpu", multi_fidelity=None, calibration={"images": 64})
    rankopt.run_study(cfg, run_dir=str(tmp_path / "on"))
    files = list((tmp_path / "on" / "cache" / "calibration").glob("*.pt"))
    assert len(files) == 1
    stats = torch.load(files[0], weights_only=True)
    assert set(stats) == {"0", "3", "7", "12"}  # every target: three convs and the Linear
    # a conv averages over pixels (8x8 digits, 4x4 after the pool), the Linear per image
    assert [stats[n]["samples"] for n in ("0", "3", "7", "12")] == [64 * 64, 64 * 64, 64 * 16, 64]
    assert stats["0"]["patch"].shape == (9, 9)  # svd may lower the convs: patch moments too
    stamp = files[0].stat().st_mtime_ns
    rankopt.run_study({**cfg, "trials": 2}, run_dir=str(tmp_path / "on"))
    assert files[0].stat().st_mtime_ns == stamp  # the rerun reads them back
    rankopt.run_study({**cfg, "calibration": None}, run_dir=str(tmp_path / "off"))
    assert not (tmp_path / "off" / "cache" / "calibration").exists()


def test_calibration_config_names_the_field_and_the_range():
    with pytest.raises(rankopt.ConfigError, match="calibration.images"):
        load_config({"name": "x", "model": {"name": "lenet5"}, "calibration": {"images": 0}},
                    check_plugins=False, check_paths=False)
