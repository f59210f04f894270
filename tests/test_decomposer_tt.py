"""TT specifics: channel factorization options, bond ranks, rank padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from _decomposer_cases import flops_of, params_of, rel_error

from rankopt.compression.accounting import Cost
from rankopt.core.errors import ConfigError
from rankopt.plugins.decomposers.tt import TTDecomposer, balanced_factors, tt_max_ranks, tt_usable_ranks


@pytest.mark.parametrize(
    ("n", "parts", "expected"),
    [(64, 2, [8, 8]), (128, 2, [8, 16]), (3, 2, [3]), (1, 2, [1]), (12, 2, [3, 4]), (256, 3, [4, 8, 8]), (7 * 11, 2, [7, 11])],
)
def test_balanced_factors(n: int, parts: int, expected: list[int]) -> None:
    assert balanced_factors(n, parts) == expected
    assert math.prod(expected) == n


def test_default_options_and_max_ranks() -> None:
    dec = TTDecomposer()
    conv = nn.Conv2d(64, 128, 3)
    assert dec.default_options(conv) == {"in_factors": [8, 8], "out_factors": [8, 16]}
    # modes 8, 8, 9, 8, 16: bonds min(left, right)
    assert dec.max_ranks(conv) == (8, 64, 128, 16) == tt_max_ranks([8, 8, 9, 8, 16])


def test_explicit_factorization_changes_the_structure_and_stays_exact() -> None:
    dec = TTDecomposer()
    conv = nn.Conv2d(12, 8, 3, padding=1).double()
    options = {"in_factors": [2, 3, 2], "out_factors": [8]}
    top = dec.max_ranks(conv, options)
    assert len(top) == 4
    built = dec.build(conv, top, options=options)
    assert built.in_factors == (2, 3, 2) and built.out_factors == (8,) and len(built.in_cores) == 3
    x = torch.randn(2, 12, 6, 7, dtype=torch.float64)
    with torch.no_grad():
        assert rel_error(built(x), conv(x)) < 1e-10
    assert dec.cost(conv, top, input_hw=(6, 7), options=options) == Cost(params_of(built), flops_of(built, x[:1]))


def test_one_factor_per_side_has_the_tucker2_structure() -> None:
    from rankopt.plugins.decomposers.tucker2 import Tucker2Decomposer

    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    options = {"in_factors": [6], "out_factors": [8]}
    tt, tucker = TTDecomposer(), Tucker2Decomposer()
    assert tt.max_ranks(conv, options) == tucker.max_ranks(conv)
    for ranks in [(2, 3), (5, 7)]:
        assert tt.cost(conv, ranks, (8, 8), options) == tucker.cost(conv, ranks, (8, 8))
        # TT-SVD's first factor is HOSVD's input factor (the later one is sequentially truncated)
        a = tt.build(conv, ranks, options=options).in_cores[0].weight[:, :, 0, 0]
        b = tucker.build(conv, ranks).pointwise_in.weight[:, :, 0, 0]
        assert torch.allclose(a.T @ a, b.T @ b, atol=1e-10)


def test_bad_factorizations_are_refused() -> None:
    dec = TTDecomposer()
    conv = nn.Conv2d(12, 8, 3)
    with pytest.raises(ConfigError, match=r"in_factors=\[2, 2\] multiplies to 4, but the layer has 12 input channels.*\[3, 4\]"):
        dec.max_ranks(conv, {"in_factors": [2, 2]})
    with pytest.raises(ConfigError, match="out_factors must be a non-empty list of positive integers"):
        dec.build(conv, (1, 1, 1, 1), options={"out_factors": [8, 0.5]})


def test_surplus_rank_is_capped_so_every_counted_parameter_learns() -> None:
    # bond 2 can hold at most r1 * s2 = 1 * 2: asking 4 builds and prices 2
    dec = TTDecomposer()
    conv = nn.Conv2d(4, 6, 3).double()  # modes 2, 2, 9, 2, 3
    ranks = (1, 4, 6, 3)
    assert tt_usable_ranks([2, 2, 9, 2, 3], ranks) == (1, 2, 6, 3)
    assert tt_usable_ranks([2, 2, 9, 2, 3], (2, 4, 36, 3)) == (2, 4, 6, 3)  # right side: 2 * 3
    built = dec.build(conv, ranks)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert built.ranks == (1, 2, 6, 3)
    assert dec.cost(conv, ranks, input_hw=(7, 7)) == Cost(params_of(built), flops_of(built, x[:1]))
    assert dec.cost(conv, ranks, input_hw=(7, 7)) == dec.cost(conv, (1, 2, 6, 3), input_hw=(7, 7))
    assert rel_error(built.reconstruct_weight(), dec.project(conv.weight, ranks)) < 1e-12
    # no dead slice: every output and input channel of every core gets a gradient
    built(x).square().sum().backward()
    for name, p in built.named_parameters():
        grad = p.grad.reshape(p.shape[0], p.shape[1] if p.dim() > 1 else 1, -1)
        assert (grad.abs().sum(dim=(1, 2)) > 0).all(), f"{name}: a dead output slice"
        if p.dim() > 1:
            assert (grad.abs().sum(dim=(0, 2)) > 0).all(), f"{name}: a dead input slice"
    # a selector's per-bond ranks come out capped already
    assert dec.ranks_from_matrix_ranks(conv, (2, 4, 36, 3)) == (2, 4, 6, 3)


def test_rank_matrices_are_the_bond_unfoldings() -> None:
    dec = TTDecomposer()
    conv = nn.Conv2d(4, 6, 3)
    mats = dec.rank_matrices(conv.weight)  # modes 2, 2, 9, 2, 3
    assert [tuple(m.shape) for m in mats] == [(2, 108), (4, 54), (36, 6), (72, 3)]
    assert [min(m.shape) for m in mats] == list(dec.max_ranks(conv))
    # the bond after the input channels is the Tucker mode-1 unfolding, up to column order
    tucker_in = conv.weight.detach().transpose(0, 1).reshape(4, -1)
    assert torch.allclose(torch.linalg.svdvals(mats[1]), torch.linalg.svdvals(tucker_in), atol=1e-6)
