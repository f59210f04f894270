"""TDLRT: the rank-adaptive Tucker integrator, and the strategy on real data (digits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from strategies_support import INPUT_SHAPE, grow_from_rank_2, make_context

import rankopt
from rankopt.core.errors import ConfigError
from rankopt.plugins.strategies._tdlrt_layers import TuckerTrainingConv2d, truncation_rank
from rankopt.compression.surgery import LayerInfo


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
    # (plain SGD on the factors, the paper's descent step: at tau 0.35 and 1 epoch about 0.90)
    assert outcome.extra["accuracy_after_compression"] > 0.85
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


def _span_projector(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the column space of ``matrix`` (by SVD, not QR)."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    u = u[:, s > 1e-9 * s[0]]
    return u @ u.T


def test_low_rank_step_matches_the_integrators_formulas() -> None:
    """Below full rank: the augmented bases and the new kernel, computed from seed 003's formulas.

    K-step: span(U~_i) = span([U_i, Mat_i(D x_{j!=i} U_j^T) Mat_i(C)^T]) (the QR factor of
    Mat_i(C)^T only changes the basis of that span); S-step then truncation at a tolerance
    below every singular value: W_new = W + D x_0 P_out x_1 P_in with P the projectors.
    """
    torch.set_default_dtype(torch.float64)
    try:
        _, layer = _layer((2, 3))
        core, u_out, u_in = layer.core.clone(), layer.u_out.clone(), layer.u_in.clone()
        before = layer.low_rank_weight()
        update = 0.3 * torch.randn_like(before)
        with torch.no_grad():
            layer.delta.copy_(update)
        layer.integrate(tau=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)
    r_out, r_in = core.shape[:2]
    mat_c_out = core.reshape(r_out, -1)  # Mat_0(C): r_out x (r_in*k*k)
    mat_c_in = core.transpose(0, 1).reshape(r_in, -1)
    d_out = torch.einsum("tskl,sb->tbkl", update, u_in).reshape(8, -1)  # Mat_0(D x_1 U_in^T)
    d_in = torch.einsum("tskl,ta->sakl", update, u_out).reshape(6, -1)
    p_out = _span_projector(torch.cat([u_out, d_out @ mat_c_out.T], dim=1))
    p_in = _span_projector(torch.cat([u_in, d_in @ mat_c_in.T], dim=1))
    assert layer.ranks == (2 * r_in, 2 * r_out)  # generic update: every new direction kept
    assert torch.allclose(layer.u_out @ layer.u_out.T, p_out, atol=1e-8)
    assert torch.allclose(layer.u_in @ layer.u_in.T, p_in, atol=1e-8)
    expected = before + torch.einsum("tskl,xt,ys->xykl", update, p_out, p_in)
    assert torch.allclose(layer.low_rank_weight(), expected, atol=1e-8)
    # ... which is not the full update: the part outside the augmented spans is dropped
    assert not torch.allclose(layer.low_rank_weight(), before + update, atol=1e-3)


@pytest.mark.parametrize("planted", [(2, 3), (1, 5)])
def test_tau_recovers_a_planted_tucker_rank_under_noise(planted: tuple[int, int]) -> None:
    """A full-rank layer holding a rank-``planted`` kernel plus 1% noise truncates to exactly it."""
    g = torch.Generator().manual_seed(0)
    r_in, r_out = planted
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    u_out = torch.linalg.qr(torch.randn(8, r_out, generator=g, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(6, r_in, generator=g, dtype=torch.float64))[0]
    signal = torch.einsum("abkl,ta,sb->tskl", torch.randn(r_out, r_in, 3, 3, generator=g, dtype=torch.float64), u_out, u_in)
    noise = torch.randn(8, 6, 3, 3, generator=g, dtype=torch.float64)
    noise *= 0.01 * signal.norm() / noise.norm()
    ranks = {}
    for tau in (0.002, 0.05):
        layer = TuckerTrainingConv2d.from_factors(
            conv, signal + noise, torch.eye(8, dtype=torch.float64), torch.eye(6, dtype=torch.float64),
            None, max_ranks=(6, 8),
        )
        assert layer.ranks == (6, 8)
        layer.integrate(tau=tau)  # no update: the truncation alone
        ranks[tau] = layer.ranks
        if tau == 0.05:  # above the noise (1%), below the weakest planted direction
            assert layer.ranks == planted
            assert (layer.low_rank_weight() - signal).norm() <= 0.011 * signal.norm()
    assert ranks[0.002][0] > r_in and ranks[0.002][1] > r_out  # under the noise: noise kept


def _taus_rank(target: torch.Tensor, tau: float) -> tuple[int, int]:
    """(r_in, r_out) that truncation at relative tolerance ``tau`` gives the target kernel."""
    return tuple(  # type: ignore[return-value]
        truncation_rank(torch.linalg.svdvals(target.movedim(m, 0).reshape(target.shape[m], -1)),
                        tau * float(target.norm()))
        for m in (1, 0)
    )


def test_ranks_grow_from_2_to_where_tau_puts_them() -> None:
    """A layer that needs rank 16, started at rank 2: the paper's integrator (factored, the
    default) rises to tau's rank, 16 at tau 0.1, when one step moves the weights enough."""
    target, ranks, history = grow_from_rank_2(tau=0.1, lr=0.25, steps=60, record_at=(10, 60))
    assert _taus_rank(target, 0.1) == (16, 16)
    assert ranks == (16, 16)
    assert history[1][1] > (2, 2)  # growing within the first 10 steps


def test_rank_growth_needs_the_step_to_pass_the_tolerance() -> None:
    """Why the earlier runs never grew: the new directions one step adds must carry more than
    tau * ||C||. With steps that remove 3% of the error they do not (the K- and L-step
    gradients vanish once the rank-2 layer fits what it can), and the rank stays at 2;
    carry_truncated (kernel mode, remainder carried) accumulates them until they pass."""
    assert grow_from_rank_2(tau=0.1, lr=0.03, steps=60)[1] == (2, 2)
    assert grow_from_rank_2(tau=0.1, lr=0.03, steps=150, carry=True)[1] == (16, 16)


def test_strategy_ranks_grow_on_digits_from_low_starting_ranks() -> None:
    """The strategy itself (factored, the paper's integrator, tau 0.1) started at a tenth of the
    largest ranks: with steps large enough, the learned ranks rise above the start."""
    ctx = make_context()
    rankopt.strategy("tdlrt").run(
        ctx, {"tau": 0.1, "epochs": 1, "lr": 0.3, "initial_rank_fraction": 0.1}
    )
    start = ctx.reported["tdlrt_rank_history"][0]["ranks"]
    learned = ctx.reported["tdlrt_ranks"]
    assert start["7"] == [7, 7]
    assert learned["7"][0] > 7 and learned["7"][1] > 7
    assert sum(map(sum, learned.values())) > sum(map(sum, start.values()))


def _pair(stride: int = 1, seed: int = 0) -> tuple[TuckerTrainingConv2d, TuckerTrainingConv2d]:
    """The same 6 -> 10 3x3 Tucker layer at ranks (3, 4), in kernel mode and factored."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 10, 3, padding=1, stride=stride)
    factors = (0.3 * torch.randn(4, 3, 3, 3), torch.randn(10, 4), torch.randn(6, 3), conv.bias)
    kernel = TuckerTrainingConv2d.from_factors(conv, *factors, max_ranks=(6, 10))
    factored = TuckerTrainingConv2d.from_factors(conv, *factors, max_ranks=(6, 10), factored=True)
    return kernel, factored


@pytest.mark.parametrize("stride", [1, 2])
def test_factored_training_matches_the_kernel_path(stride: int) -> None:
    """Same outputs, same input and bias gradients, and the same integrator step (plain SGD)."""
    kernel, factored = _pair(stride)
    x = torch.randn(4, 6, 9, 9)
    xk, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yk, yf = kernel(xk), factored(xf)
    assert torch.allclose(yk, yf, atol=1e-5)
    weights = torch.randn_like(yk)
    (yk * weights).sum().backward()
    (yf * weights).sum().backward()
    assert torch.allclose(xk.grad, xf.grad, atol=1e-5)
    assert torch.allclose(kernel.bias.grad, factored.bias.grad, atol=1e-4)
    # the factored step gradients are the projections of the kernel path's dense gradient
    dense_grad = kernel.delta.grad
    pending = factored._pending
    assert pending is not None
    expected_core_grad = torch.einsum("tskl,tx,sy->xykl", dense_grad, pending.aug_out, pending.aug_in)
    assert torch.allclose(pending.core_grad, expected_core_grad, atol=1e-4)
    lr = 0.05
    with torch.no_grad():
        kernel.delta.copy_(-lr * dense_grad)
    kernel.integrate(1e-4)
    factored.integrate(1e-4, lr=lr)
    assert kernel.ranks == factored.ranks == (6, 8)  # grown: every new direction kept
    assert torch.allclose(kernel.low_rank_weight(), factored.low_rank_weight(), atol=1e-5)
    assert torch.allclose(kernel.u_out @ kernel.u_out.T, factored.u_out @ factored.u_out.T, atol=1e-5)
    kernel.eval(), factored.eval()
    with torch.no_grad():
        assert torch.allclose(kernel(x), factored(x), rtol=1e-4, atol=1e-4)


class _KernelShapeWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every tensor an op produces or takes whose shape is the full kernel's."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.seen = torch.Size(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        flat = list(args) + list((kwargs or {}).values()) + (list(out) if isinstance(out, (tuple, list)) else [out])
        self.seen += [str(func) for t in flat if isinstance(t, torch.Tensor) and t.shape == self.shape]
        return out


@pytest.mark.parametrize("factored", [True, False])
def test_factored_training_never_builds_the_full_kernel(factored: bool) -> None:
    """Forward, backward, integrate and the eval forward of a factored layer touch no tensor of
    the kernel's shape (10, 6, 3, 3); the kernel path does (so the watch can fail)."""
    kernel, fact = _pair()
    layer = fact if factored else kernel
    watch = _KernelShapeWatch((10, 6, 3, 3))
    x = torch.randn(2, 6, 7, 7, requires_grad=True)
    with watch:
        layer(x).square().sum().backward()
        layer.integrate(0.1, lr=0.01)
        layer.eval()
        with torch.no_grad():
            layer(x)
    assert (watch.seen == []) is factored, watch.seen[:5]


def test_factored_mode_rejects_carry_and_needs_lr() -> None:
    _, layer = _pair()
    layer(torch.randn(1, 6, 5, 5)).sum().backward()
    with pytest.raises(ConfigError, match="carry=True"):
        layer.integrate(0.1, carry=True, lr=0.1)
    with pytest.raises(ConfigError, match="needs lr"):
        layer.integrate(0.1)


def test_strategy_trains_factored_at_the_loops_learning_rate() -> None:
    """The strategy's layers are factored and step at the loop's scheduled learning rate."""
    from rankopt.plugins.strategies import _tdlrt_layers

    seen: list[float] = []
    original = _tdlrt_layers.TuckerTrainingConv2d.integrate

    def spy(self, tau, *, carry=False, lr=None):  # type: ignore[no-untyped-def]
        assert self.factored and self.delta is None
        seen.append(lr)
        return original(self, tau, carry=carry, lr=lr)

    ctx = make_context()
    _tdlrt_layers.TuckerTrainingConv2d.integrate = spy  # type: ignore[method-assign]
    try:
        rankopt.strategy("tdlrt").run(ctx, {"tau": 0.2, "epochs": 0.2, "lr": 0.04})
    finally:
        _tdlrt_layers.TuckerTrainingConv2d.integrate = original  # type: ignore[method-assign]
    per_step = seen[::3]  # three conv layers per step
    assert per_step[0] == pytest.approx(0.04)  # cosine schedule: the first step at lr
    assert all(a >= b for a, b in zip(per_step, per_step[1:])) and per_step[-1] < 0.04
