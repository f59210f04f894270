"""svd's tiles option: DeepTwist's tiling-based SVD (seeds/002 section 4.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _decomposer_cases import flops_of, params_of, rel_error

import rankopt
from rankopt.compression.accounting import Cost
from rankopt.core.errors import ConfigError
from rankopt.plugins.decomposers._tiles import tile_sizes
from rankopt.plugins.decomposers.svd import SVDDecomposer

LAYERS = [
    ("linear_even", lambda: nn.Linear(12, 8), [2, 3], None),
    ("linear_nobias", lambda: nn.Linear(12, 9, bias=False), [3, 2], None),
    ("conv_lowered", lambda: nn.Conv2d(5, 6, 3, padding=1), [2, 3], (7, 9)),
    ("conv_stride_dil", lambda: nn.Conv2d(4, 9, (3, 2), stride=2, padding=(1, 0), dilation=(2, 1)), [3, 2], (11, 8)),
]


def _make(factory):  # seeded float64 layer
    torch.manual_seed(0)
    return factory().double()


def _example(layer: nn.Module, hw):
    g = torch.Generator().manual_seed(1)
    shape = (3, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels, *hw)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(("name", "factory", "tiles", "hw"), LAYERS, ids=[c[0] for c in LAYERS])
def test_cost_build_and_projection_agree_exactly(name, factory, tiles, hw) -> None:
    dec, layer = SVDDecomposer(), _make(factory)
    options = {"tiles": tiles}
    m, n = layer.weight.reshape(layer.weight.shape[0], -1).shape
    (largest,) = dec.max_ranks(layer, options)
    assert largest == min(m // tiles[0], n // tiles[1])
    x = _example(layer, hw)
    for r in sorted({1, max(1, largest // 2), largest}):
        built = dec.build(layer, (r,), options=options)
        cost = dec.cost(layer, (r,), input_hw=hw, options=options)
        bias = m if layer.bias is not None else 0
        assert cost.params == r * (tiles[0] * n + tiles[1] * m) + bias == params_of(built)
        assert cost == Cost(params_of(built), flops_of(built, x[:1]))
        projected = dec.project(layer.weight, (r,), options)
        assert rel_error(built.reconstruct_weight(), projected) < 1e-12
        # the built module computes the layer with its kernel replaced by the projection
        reference = layer
        with torch.no_grad():
            original = reference.weight.clone()
            reference.weight.copy_(projected)
            expected = reference(x)
            reference.weight.copy_(original)
            assert rel_error(built(x), expected) < 1e-10
        # each tile has rank at most r, and projecting again changes nothing
        mat = projected.reshape(m, n)
        rows = torch.split(mat, tile_sizes(m, tiles[0]), 0)
        for row in rows:
            for tile in torch.split(row, tile_sizes(n, tiles[1]), 1):
                assert torch.linalg.matrix_rank(tile) <= r
        assert rel_error(dec.project(projected, (r,), options), projected) < 1e-10
    # at full tile rank it reproduces the layer
    full = dec.build(layer, (largest,), options=options)
    with torch.no_grad():
        assert rel_error(full(x), layer(x)) < 1e-10


def test_tiles_beat_one_svd_on_a_matrix_whose_tiles_differ() -> None:
    """The seed's motivation: 2 x 2 tiles with unrelated low-rank content."""
    g = torch.Generator().manual_seed(0)
    blocks = [[torch.randn(16, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 16, generator=g, dtype=torch.float64)
               for _ in range(2)] for _ in range(2)]
    layer = nn.Linear(32, 32, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.cat([torch.cat(row, 1) for row in blocks], 0))
    dec = SVDDecomposer()
    # same params: 2 x 2 tiles at rank 1 (1 * (2*32 + 2*32) = 128) against one SVD at rank 2
    assert dec.cost(nn.Linear(32, 32, bias=False), (1,), options={"tiles": [2, 2]}).params == 128
    assert dec.cost(nn.Linear(32, 32, bias=False), (2,)).params == 128
    tiled = rel_error(dec.project(layer.weight, (1,), {"tiles": [2, 2]}), layer.weight)
    plain = rel_error(dec.project(layer.weight, (2,)), layer.weight)
    assert tiled < 1e-10 < 0.1 < plain


def test_tiles_one_by_one_is_plain_svd_and_deeptwist_can_use_tiles() -> None:
    dec, layer = SVDDecomposer(), _make(lambda: nn.Linear(10, 6))
    assert torch.allclose(dec.project(layer.weight, (3,), {"tiles": [1, 1]}), dec.project(layer.weight, (3,)))
    from rankopt.plugins.strategies.deeptwist import distort

    model = nn.Sequential(_make(lambda: nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4)).double()
    spec = {"0": {"decomposer": "svd", "ranks": [2], "options": {"tiles": [2, 3]}}}
    distort(model, spec)
    compressed = rankopt.compress(model, spec)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert rel_error(compressed(x), model(x)) < 1e-10


def test_bad_tiles_are_refused_with_the_value_and_the_rule() -> None:
    dec = SVDDecomposer()
    with pytest.raises(ConfigError, match=r"tiles must be \[row tiles, column tiles\], two integers >= 1, got \[2\]"):
        dec.max_ranks(nn.Linear(4, 4), {"tiles": [2]})
    with pytest.raises(ConfigError, match=r"tiles=\[3, 1\] must divide the 4 x 6 weight matrix evenly.*divisors of 4 and of 6"):
        dec.max_ranks(nn.Linear(6, 4), {"tiles": [3, 1]})
    with pytest.raises(ConfigError, match="needs numeric padding; the layer has padding='same'"):
        dec.build(nn.Conv2d(2, 4, 3, padding="same"), (1,), options={"tiles": [2, 2]})
    with pytest.raises(rankopt.InvalidRanksError, match=r"must be an integer in \[1, 2\], got 3"):
        dec.build(nn.Linear(6, 4), (3,), options={"tiles": [2, 2]})
    with pytest.raises(NotImplementedError, match="fixed selector"):
        dec.rank_matrices(torch.zeros(4, 6), {"tiles": [2, 2]})


def test_the_docstring_and_the_error_say_tiles_must_divide_the_matrix_evenly() -> None:
    doc = " ".join((SVDDecomposer.__doc__ or "").split())
    assert "as equal as possible" not in doc
    assert "must divide the matrix's rows and columns evenly" in doc
    with pytest.raises(ConfigError, match=r"tiles=\[3, 2\] must divide the 10 x 8 weight matrix evenly"):
        SVDDecomposer().build(nn.Linear(8, 10), (1,), options={"tiles": [3, 2]})
