"""TDLRT: the rank-adaptive Tucker integrator, and the strategy on real data (digits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from strategies_support import INPUT_SHAPE, make_context

import rankopt
from rankopt.errors import ConfigError
from rankopt.plugins.strategies._tdlrt_layers import TuckerTrainingConv2d, truncation_rank
from rankopt.surgery import LayerInfo


def _layer(ranks: tuple[int, int], seed: int = 0) -> tuple[nn.Conv2d, TuckerTrainingConv2d]:
    """A 6 -> 8 3x3 conv and a Tucker layer with random factors at ``ranks`` (r_in, r_out)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    r_in, r_out = ranks
    layer = TuckerTrainingConv2d.from_factors(
        conv,
        torch.randn(r_out, r_in, 3, 3),
        torch.randn(8, r_out),
        torch.randn(6, r_in),
        conv.bias,
        max_ranks=rankopt.decomposer("tucker2").max_ranks(conv),
    )
    return conv, layer


def test_truncation_rank_keeps_the_fewest_values_within_tolerance() -> None:
    s = torch.tensor([4.0, 3.0, 0.75, 0.5])  # tail norms: 5.08, 3.13, 0.901, 0.5, 0
    assert truncation_rank(s, 0.91) == 2
    assert truncation_rank(s, 0.89) == 3
    assert truncation_rank(s, 0.51) == 3
    assert truncation_rank(s, 0.49) == 4
    assert truncation_rank(s, 10.0) == 0


def test_factors_are_orthonormal_and_forward_is_the_tucker_kernel() -> None:
    conv, layer = _layer((4, 5))
    eye = torch.eye
    assert torch.allclose(layer.u_in.T @ layer.u_in, eye(4), atol=1e-5)
    assert torch.allclose(layer.u_out.T @ layer.u_out, eye(5), atol=1e-5)
    x = torch.randn(2, 6, 7, 7)
    kernel = layer.low_rank_weight()
    assert torch.allclose(layer(x), nn.functional.conv2d(x, kernel, layer.bias, padding=1), atol=1e-5)


def test_full_rank_step_applies_the_update_exactly() -> None:
    # at full ranks the augmented bases span everything: W_new = W + D
    _, layer = _layer((6, 8))
    before = layer.low_rank_weight()
    update = 0.1 * torch.randn_like(before)
    with torch.no_grad():
        layer.delta.copy_(update)
    layer.integrate(tau=1e-6)
    assert torch.allclose(layer.low_rank_weight(), before + update, atol=1e-5)
    assert not layer.delta.any()


def test_update_in_the_span_keeps_the_ranks() -> None:
    _, layer = _layer((2, 3))
    before = layer.low_rank_weight()
    with torch.no_grad():
        layer.delta.copy_(0.5 * before)
    layer.integrate(tau=1e-4)
    assert layer.ranks == (2, 3)
    assert torch.allclose(layer.low_rank_weight(), 1.5 * before, atol=1e-5)


def test_ranks_grow_along_new_gradient_directions_and_shrink_with_tau() -> None:
    _, layer = _layer((2, 2))
    with torch.no_grad():
        layer.delta.copy_(torch.randn_like(layer.delta))  # large, in new directions
    layer.integrate(tau=1e-3)
    assert layer.ranks == (4, 4)  # doubled: the augmented bases are kept
    assert torch.allclose(layer.u_in.T @ layer.u_in, torch.eye(4), atol=1e-5)
    layer.integrate(tau=0.6)  # no update, coarse tolerance: truncation only
    assert layer.ranks[0] < 4 and layer.ranks[1] < 4


def test_to_tucker2_has_the_decomposers_structure_and_the_same_function() -> None:
    conv, layer = _layer((3, 4))
    built = layer.to_tucker2(conv)
    reference = rankopt.decomposer("tucker2").build(conv, (3, 4), initialize=False)
    assert type(built) is type(reference)
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        assert torch.allclose(built(x), layer(x), atol=1e-5)


def test_learned_ranks_fall_as_tau_grows_and_the_model_reloads(tmp_path: object) -> None:
    learned = {}
    for tau in (0.1, 0.2, 0.35):
        ctx = make_context()
        outcome = rankopt.strategy("tdlrt").run(ctx, {"tau": tau, "epochs": 1, "lr": 0.05})
        ranks = ctx.reported["tdlrt_ranks"]
        assert set(ranks) == {"0", "3", "7"}  # the three convs; the Linear stays dense
        history = ctx.reported["tdlrt_rank_history"]
        assert history[0]["ranks"]["7"] == [64, 64]  # started at full rank (fraction 1.0)
        learned[tau] = sum(r for layer in ("3", "7") for r in ranks[layer])
        for name, entry in outcome.spec.items():
            assert entry == {"decomposer": "tucker2", "ranks": ranks[name]}
    assert learned[0.1] > learned[0.2] > learned[0.35]

    # the last model is an ordinary compressed model: spec + state_dict reload exactly
    assert outcome.extra["accuracy_after_compression"] > 0.9
    path = tmp_path / "tdlrt.pt"  # type: ignore[operator]
    rankopt.save_compressed(path, outcome.model, outcome.spec)
    fresh = rankopt.model("small_cnn", num_classes=10, in_channels=1)
    reloaded = rankopt.load_compressed(path, model=fresh)
    assert reloaded.state_dict().keys() == outcome.model.state_dict().keys()
    x = torch.randn(16, *INPUT_SHAPE[1:])
    outcome.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), outcome.model(x))
    assert ctx.evaluate(reloaded) == outcome.extra["accuracy_after_compression"]


def test_no_conv_target_is_a_config_error() -> None:
    linear_only = [LayerInfo("12", "linear", 1024, 10, (1, 1))]
    ctx = make_context(targets=linear_only, decomposers="svd")
    with pytest.raises(ConfigError, match="no target layer is a Conv2d"):
        rankopt.strategy("tdlrt").run(ctx, {})


def test_targets_without_input_size_and_no_training_keep_the_initial_ranks() -> None:
    # epochs 0: the result is the reference's Tucker-2 at the initial ranks
    conv7 = [LayerInfo("7", "conv2d", 64, 64, (3, 3))]  # no input_hw given
    ctx = make_context(targets=conv7)
    outcome = rankopt.strategy("tdlrt").run(
        ctx, {"epochs": 0, "initial_rank_fraction": 0.25, "tau": 0.3}
    )
    assert outcome.spec == {"7": {"decomposer": "tucker2", "ranks": [16, 16]}}
    expected = ctx.compress(ctx.model(), outcome.spec).eval()
    outcome.model.eval()
    x = torch.randn(8, *INPUT_SHAPE[1:])
    with torch.no_grad():
        assert torch.allclose(outcome.model(x), expected(x), atol=1e-4)
