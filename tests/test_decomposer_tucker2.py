"""Tucker-2 and SVD specifics: HOSVD/HOOI, shared spectral cache, factor layout."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn as nn
from _decomposer_cases import rel_error

from rankopt.plugins.decomposers.svd import SVDDecomposer
from rankopt.plugins.decomposers.tucker2 import Tucker2Decomposer
from rankopt.compression.spectral import SpectralCache, get_default_cache, set_default_cache


@pytest.fixture
def fresh_cache() -> Iterator[SpectralCache]:
    before = get_default_cache()
    cache = SpectralCache()
    set_default_cache(cache)
    try:
        yield cache
    finally:
        set_default_cache(before)


def test_max_ranks_are_the_unfolding_ranks() -> None:
    dec = Tucker2Decomposer()
    assert dec.max_ranks(nn.Conv2d(64, 128, 3)) == (64, 128)
    assert dec.max_ranks(nn.Conv2d(64, 3, 3)) == (27, 3)  # S capped by T*kh*kw
    assert dec.max_ranks(nn.Conv2d(64, 128, 1)) == (64, 64)


def test_hosvd_shares_its_svds_through_the_cache(fresh_cache: SpectralCache) -> None:
    dec = Tucker2Decomposer()
    conv = nn.Conv2d(8, 12, 3)
    dec.build(conv, (4, 5))
    assert fresh_cache.svd_calls == 2  # one per unfolding
    for m in dec.rank_matrices(conv.weight):  # what a rank selector reads: answered from the cache
        fresh_cache.singular_values(m)
    dec.build(conv, (2, 3))  # another trial at other ranks
    assert fresh_cache.svd_calls == 2 and fresh_cache.hits == 4
    svd = SVDDecomposer()
    svd.build(conv, (3,))
    fresh_cache.singular_values(svd.rank_matrices(conv.weight)[0])
    assert fresh_cache.svd_calls == 2  # svd's T x (S*kh*kw) matrix is Tucker's mode-0 unfolding


def test_hooi_is_never_worse_than_hosvd() -> None:
    dec = Tucker2Decomposer()
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 16, 3).double()
    for ranks in [(3, 4), (6, 8), (9, 5)]:
        hosvd = rel_error(dec.project(conv.weight, ranks), conv.weight)
        hooi = rel_error(dec.project(conv.weight, ranks, {"init": "hooi"}), conv.weight)
        assert hooi <= hosvd + 1e-12
        built = dec.build(conv, ranks, options={"init": "hooi", "n_iter_max": 50})
        assert rel_error(built.reconstruct_weight(), conv.weight) <= hosvd + 1e-12


def test_factor_layout_matches_the_paper() -> None:
    # 1x1 S -> r_in has orthonormal rows (U_in^T), the last 1x1 orthonormal columns (U_out)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1).double()
    built = Tucker2Decomposer().build(conv, (3, 5))
    u_in = built.pointwise_in.weight[:, :, 0, 0]
    u_out = built.pointwise_out.weight[:, :, 0, 0]
    assert torch.allclose(u_in @ u_in.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(u_out.T @ u_out, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert built.core.stride == (2, 2) and built.pointwise_in.bias is None
    assert torch.equal(built.pointwise_out.bias, conv.bias)


@pytest.mark.parametrize(("split", "first_norm_is_1"), [("first", False), ("second", True)])
def test_svd_split_puts_the_singular_values_where_asked(split: str, first_norm_is_1: bool) -> None:
    lin = nn.Linear(10, 8).double()
    built = SVDDecomposer().build(lin, (4,), options={"split": split})
    rows = built.linear_in.weight.norm(dim=1)
    assert torch.allclose(rows, torch.ones(4, dtype=torch.float64)) == first_norm_is_1
    x = torch.randn(3, 10, dtype=torch.float64)
    balanced = SVDDecomposer().build(lin, (4,))
    with torch.no_grad():
        assert rel_error(built(x), balanced(x)) < 1e-12
