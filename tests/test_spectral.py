"""The spectral cache: one SVD per weight content, shared across selections and processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.compression.selection import select_spec
from rankopt.compression.spectral import SpectralCache, get_default_cache, matrix_key, set_default_cache


def _small_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
            nn.Conv2d(24, 32, 3, padding=1),
        )


def _select(net: nn.Module, cache: SpectralCache, selector: str = "energy", **params: float) -> dict:
    layers = rankopt.find_layers(net, (1, 3, 8, 8))
    spec, _ = select_spec(net, layers, {la.name: "tucker2" for la in layers}, selector, params, cache=cache)
    return spec


def test_second_selection_on_same_weights_performs_no_svd() -> None:
    net, cache = _small_net(), SpectralCache()
    _select(net, cache, p=0.9)
    assert cache.svd_calls == 6  # two unfoldings per conv
    _select(net, cache, p=0.95)
    _select(net, cache, "vbmf")
    _select(net, cache, "approx_ratio", ratio=0.8)
    _select(net, cache, "budget", target=0.5)
    assert cache.svd_calls == 6
    assert cache.hits >= 24


def test_disk_cache_survives_a_new_process(tmp_path: Path) -> None:
    net, cache = _small_net(), SpectralCache(tmp_path / "spectral")
    first = _select(net, cache, p=0.9)
    assert cache.svd_calls == 6
    assert len(list((tmp_path / "spectral").rglob("*.pt"))) == 6
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_spectral import _small_net, _select
        from rankopt.compression.spectral import SpectralCache
        cache = SpectralCache({str(tmp_path / "spectral")!r})
        spec = _select(_small_net(), cache, p=0.9)
        print(json.dumps({{"svd_calls": cache.svd_calls, "hits": cache.hits, "spec": spec}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    import json

    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["svd_calls"] == 0
    assert report["hits"] == 6
    assert report["spec"] == first


def test_cache_misses_after_the_weight_changes(tmp_path: Path) -> None:
    net, cache = _small_net(), SpectralCache(tmp_path)
    _select(net, cache, p=0.9)
    with torch.no_grad():
        net[2].weight[0, 0, 0, 0] += 1e-3  # one entry of one layer
    _select(net, cache, p=0.9)
    assert cache.svd_calls == 8  # only the changed layer's two unfoldings again


def test_full_svd_is_correct_and_answers_singular_value_requests() -> None:
    cache = SpectralCache()
    g = torch.Generator().manual_seed(0)
    for shape in [(7, 30), (30, 7), (12, 12)]:
        m = torch.randn(*shape, generator=g)
        u, s, vh = cache.svd(m)
        assert u.shape == (shape[0], min(shape)) and vh.shape == (min(shape), shape[1])
        torch.testing.assert_close(u @ torch.diag(s) @ vh, m.double(), atol=1e-10, rtol=0)
        torch.testing.assert_close(u.T @ u, torch.eye(min(shape), dtype=torch.float64), atol=1e-10, rtol=0)
        calls = cache.svd_calls
        torch.testing.assert_close(cache.singular_values(m), s)
        assert cache.svd_calls == calls
    # the values-only path agrees with the full SVD
    m = torch.randn(40, 9, generator=g)
    torch.testing.assert_close(SpectralCache().singular_values(m), cache.svd(m)[1])


def test_key_depends_on_content_shape_and_dtype() -> None:
    m = torch.arange(12.0).reshape(3, 4)
    assert matrix_key(m) == matrix_key(m.clone())
    assert matrix_key(m) != matrix_key(m.reshape(4, 3))
    assert matrix_key(m) != matrix_key(m.double())
    assert matrix_key(m.T) == matrix_key(m.T.contiguous())


def test_memory_store_is_bounded_in_bytes_and_falls_back_to_disk(tmp_path: Path) -> None:
    cache = SpectralCache(tmp_path, max_bytes=5_000)
    mats = [torch.randn(20, 20, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for m in mats:
        cache.svd(m)  # each entry is ~6.7 kB: larger than the bound, so disk only
    assert cache._mem_bytes <= 5_000
    calls = cache.svd_calls
    for m in mats:
        cache.svd(m)
    assert cache.svd_calls == calls


def test_default_cache_can_be_replaced_and_restored(tmp_path: Path) -> None:
    original = get_default_cache()
    mine = SpectralCache(tmp_path)
    try:
        set_default_cache(mine)
        assert get_default_cache() is mine
        with pytest.raises(TypeError, match="SpectralCache"):
            set_default_cache("not a cache")  # type: ignore[arg-type]
    finally:
        set_default_cache(original)
    assert get_default_cache() is original


def test_torn_cache_file_is_a_miss(tmp_path: Path) -> None:
    m = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    SpectralCache(tmp_path).singular_values(m)
    for f in tmp_path.rglob("*.pt"):
        f.write_bytes(b"not a tensor file")
    cache = SpectralCache(tmp_path)
    cache.singular_values(m)
    assert cache.svd_calls == 1
