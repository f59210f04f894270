"""Tests of the rankopt-tensor-ring distribution, written as any third-party plugin's would be.

They use rankopt's public API and its contract kit ``rankopt.testing`` only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import rankopt
from rankopt.testing import assert_decomposer, check_decomposer
from rankopt_tensor_ring import TensorRingConv2d, TensorRingDecomposer, balanced_factors, ring_max_ranks, tr_svd
from rankopt_tensor_ring.ring import kernel_to_ring, ring_reconstruct, ring_to_kernel


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: threads only add contention on a shared CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _conv(*args, seed: int = 0, **kwargs) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(*args, **kwargs).double()


def test_the_decomposer_honours_the_rankopt_contract():
    assert_decomposer(TensorRingDecomposer())


def test_contract_holds_for_three_factor_rings_and_odd_geometry():
    modules = {
        "same_padding_dilated": nn.Conv2d(8, 12, 3, padding="same", dilation=2),
        "rect_stride": nn.Conv2d(12, 8, (3, 5), stride=(2, 1), padding=(1, 2), bias=False),
    }
    results = check_decomposer(TensorRingDecomposer(), modules, input_hw=(9, 7))
    failed = [str(r) for r in results if not r.passed]
    assert not failed, failed


@pytest.mark.parametrize(
    ("n", "parts", "expected"),
    [(64, 2, [8, 8]), (12, 2, [4, 3]), (64, 3, [4, 4, 4]), (7, 2, [7]), (6, 2, [3, 2]), (1, 2, [1]), (512, 2, [32, 16])],
)
def test_balanced_factors(n, parts, expected):
    assert balanced_factors(n, parts) == expected
    assert math.prod(expected) == n


def test_kernel_ring_layout_round_trips():
    w = torch.randn(6, 8, 3, 2, dtype=torch.float64)
    ring = kernel_to_ring(w, [2, 4], [3, 2])
    assert ring.shape == (2, 4, 6, 3, 2)
    # entry check: input channel c = i1 * 4 + i2, output o = o1 * 2 + o2
    assert ring[1, 3, 4, 2, 1] == w[2 * 2 + 1, 1 * 4 + 3, 4 // 2, 4 % 2]
    assert torch.equal(ring_to_kernel(ring, [2, 4], [3, 2], (3, 2)), w)


def test_max_ranks_follow_the_tr_svd_bounds():
    # modes [3, 2, 9, 4, 2]: start at the 9-mode, 9 = 3 * 3, then TT-SVD bounds round the ring
    assert ring_max_ranks([3, 2, 9, 4, 2]) == (18, 6, 3, 3, 12)
    conv = _conv(6, 8, 3)
    assert TensorRingDecomposer().max_ranks(conv) == (18, 6, 3, 3, 12)


def test_tr_svd_is_exact_at_the_largest_ranks_and_keeps_requested_core_shapes():
    torch.manual_seed(1)
    t = torch.randn(2, 4, 9, 3, 2, dtype=torch.float64)
    top = ring_max_ranks(t.shape)
    cores = tr_svd(t, top)
    assert torch.allclose(ring_reconstruct(cores), t, atol=1e-12)
    small = (1, 2, 2, 3, 2)
    cores = tr_svd(t, small)
    d = len(small)
    assert [tuple(c.shape) for c in cores] == [(small[k], t.shape[k], small[(k + 1) % d]) for k in range(d)]


def test_projection_is_idempotent_where_plain_tr_svd_is_not():
    dec = TensorRingDecomposer()
    w = _conv(8, 8, 3).weight.detach()
    ranks = (2, 2, 3, 3, 2)
    once = dec.project(w, ranks)
    twice = dec.project(once, ranks)
    assert (twice - once).norm() / once.norm() < 1e-10
    assert (once - w).norm() / w.norm() > 0.1  # it really truncated


def test_uniform_paper_style_ranks_and_explicit_factorization():
    dec = TensorRingDecomposer()
    conv = _conv(8, 8, 3, padding=1)
    options = {"in_factors": [2, 2, 2], "out_factors": [2, 2, 2]}
    top = dec.max_ranks(conv, options)
    assert len(top) == 7
    uniform = (min(2, min(top)),) * 7
    layer = dec.build(conv, uniform, options=options)
    assert isinstance(layer, TensorRingConv2d)
    assert len(layer.in_cores) == 3 and len(layer.out_cores) == 3
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    cost = dec.cost(conv, uniform, input_hw=(6, 6), options=options)
    assert cost == rankopt.Cost(sum(p.numel() for p in layer.parameters()), counter.get_total_flops())
    # the layer computes the conv with its reconstructed kernel
    expected = nn.functional.conv2d(x, layer.reconstruct_weight(), conv.bias, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-12)
    # and that kernel is the projection of the original at these ranks
    assert torch.allclose(layer.reconstruct_weight(), dec.project(conv.weight, uniform, options), atol=1e-12)


def test_bad_options_and_ranks_fail_with_the_value_and_the_rule():
    dec = TensorRingDecomposer()
    conv = _conv(6, 8, 3)
    with pytest.raises(rankopt.ConfigError, match=r"in_factors=\[4, 2\] multiplies to 8.*6 input channels"):
        dec.max_ranks(conv, {"in_factors": [4, 2]})
    with pytest.raises(rankopt.ConfigError, match=r"no option\(s\) \['rank'\]; known options are \['in_factors', 'out_factors'\]"):
        dec.max_ranks(conv, {"rank": 3})
    with pytest.raises(rankopt.InvalidRanksError, match=r"must be an integer in \[1, 18\], got 19"):
        dec.build(conv, (19, 1, 1, 1, 1))
    with pytest.raises(rankopt.InvalidRanksError, match="must have 5 entries"):
        dec.cost(conv, (1, 1, 1), input_hw=(8, 8))
    with pytest.raises(rankopt.UnsupportedModuleError, match="grouped"):
        dec.build(nn.Conv2d(4, 4, 3, groups=2), (1, 1, 1, 1, 1))


def test_registered_through_its_entry_point_and_compresses_a_model(tmp_path):
    rankopt.reset_registry()
    try:
        assert "tensor_ring" in rankopt.plugin_names()["decomposers"]
        source = rankopt.get_registry().source_of("decomposers", "tensor_ring")
        assert (source.distribution, source.builtin) == ("rankopt-tensor-ring", False)
        assert isinstance(rankopt.decomposer("tensor_ring"), TensorRingDecomposer)

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
        spec = {"2": {"decomposer": "tensor_ring", "ranks": [2, 2, 2, 2, 2], "options": {"in_factors": [4, 4], "out_factors": [4, 4]}}}
        small = rankopt.compress(model, spec).eval()
        assert rankopt.count(small, (1, 3, 8, 8)).params < rankopt.count(model, (1, 3, 8, 8)).params
        path = rankopt.save_compressed(tmp_path / "tr.pt", small, spec, input_shape=(1, 3, 8, 8))
        again = rankopt.load_compressed(path, model)
        x = torch.randn(2, 3, 8, 8)
        assert torch.allclose(again(x), small(x))
    finally:
        rankopt.reset_registry()
