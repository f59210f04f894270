"""ADMM (HODEC): the residual ||W - Z|| / ||W|| falls under the tolerance; compression then costs little."""

from __future__ import annotations

import math

import pytest
import torch
from strategies_support import (
    AGGRESSIVE,
    make_context,
    plain_compression_loss,
)

import rankopt
from rankopt.plugins.strategies.admm import ADMMState


def test_update_is_projection_then_dual_ascent() -> None:
    ctx = make_context(**AGGRESSIVE)
    model = ctx.model()
    spec = ctx.select_ranks(model)
    state = ADMMState(model, spec, rho=2.0)
    tucker2 = rankopt.decomposer("tucker2")
    name = "7"
    ranks = spec[name]["ranks"]
    weight = model.get_submodule(name).weight
    assert torch.allclose(state.z[name], tucker2.project(weight.detach(), ranks))
    assert not state.u[name].any()
    # the penalty is rho/2 ||W - Z + U||^2 summed over the layers
    expected = sum(
        ((model.get_submodule(n).weight - state.z[n] + state.u[n]) ** 2).sum() for n in spec
    )
    assert torch.allclose(state.penalty(model), 1.0 * expected)
    with torch.no_grad():
        weight.add_(0.01 * torch.randn_like(weight))
    u_before = state.u[name].clone()
    residuals = state.update(model)
    z = tucker2.project(weight.detach() + u_before, ranks)
    assert torch.allclose(state.z[name], z, atol=1e-6)
    assert torch.allclose(state.u[name], u_before + weight.detach() - z, atol=1e-6)
    gap = float((weight.detach() - z).norm() / weight.detach().norm())
    assert abs(residuals[name] - gap) < 1e-5


def test_residual_falls_under_tol_and_compression_loses_less_than_plain() -> None:
    epochs, lr, tol = 5, 0.05, 0.05
    plain_before, plain_after = plain_compression_loss(3, lr)
    ctx = make_context(**AGGRESSIVE)
    outcome = rankopt.strategy("admm").run(
        ctx,
        {"rho": 3.0, "update_interval": 10, "epochs": epochs, "lr": lr, "tol": tol,
         "finetune_epochs": 0},
    )
    history = ctx.reported["admm_residual_history"]
    # far from low rank at the start, under the tolerance at the end, and training stopped there
    assert history[0] > 5 * tol
    assert history[-1] < tol <= min(history[:-1])
    step = ctx.reported["admm_converged_step"]
    assert step == 10 * (len(history) - 1)
    steps_per_epoch = math.ceil(len(ctx.splits.train) / ctx.batch_size)
    assert step < epochs * steps_per_epoch  # stopped early, at convergence
    assert max(ctx.reported["admm_final_residuals"].values()) < tol
    # decomposing the ADMM-trained weights at the target ranks costs little ...
    loss = outcome.extra["accuracy_before_compression"] - outcome.extra["accuracy_after_compression"]
    assert plain_before - plain_after > 0.10
    assert loss < 0.03 and loss < plain_before - plain_after
    assert outcome.extra["accuracy_after_compression"] >= plain_before - 0.03


@pytest.mark.parametrize("decomposer", ["tt", "tucker2"])
def test_the_smallest_interval_of_the_default_space_converges_at_the_defaults(decomposer: str) -> None:
    """HODEC's own format (tt) too: at the default space's smallest interval the residual falls."""
    strategy = rankopt.strategy("admm")
    smallest = strategy.search_space()["update_interval"].low
    assert smallest == strategy.defaults()["update_interval"] > 1
    ctx = make_context(decomposers=decomposer)
    outcome = rankopt.strategy("admm").run(
        ctx, {"update_interval": smallest, "epochs": 2, "tol": 1e-9, "finetune_epochs": 0}
    )
    assert {e["decomposer"] for e in outcome.spec.values()} == {decomposer}
    history = ctx.reported["admm_residual_history"]
    assert len(history) >= 3  # two updates at least
    assert history[-1] < 0.05 * history[0] and history[-1] < 0.02
    assert max(history) <= history[0]  # never above the start
    assert outcome.extra["accuracy_after_compression"] >= outcome.extra["accuracy_before_compression"] - 0.02


@pytest.mark.parametrize("decomposer", ["tucker2", "tt"])
@pytest.mark.parametrize("schedule", ["steps", "epoch"])
def test_both_schedules_of_the_default_space_end_under_a_residual_of_0_01(decomposer: str, schedule: str) -> None:
    """The authors' once-per-epoch schedule is a first-class option; both end near the low-rank set."""
    strategy = rankopt.strategy("admm")
    assert schedule in strategy.search_space()["schedule"].choices
    ctx = make_context(decomposers=decomposer)
    outcome = strategy.run(ctx, {"schedule": schedule, "finetune_epochs": 0})
    interval = outcome.extra["admm_update_interval"]
    assert interval == (ctx.steps_per_epoch if schedule == "epoch" else strategy.defaults()["update_interval"])
    assert outcome.extra["admm_final_residual"] < 0.01
    assert max(ctx.reported["admm_final_residuals"].values()) < 0.01
    assert outcome.extra["accuracy_after_compression"] >= outcome.extra["accuracy_before_compression"] - 0.02


def test_an_interval_under_the_momentum_horizon_trains_with_plain_sgd() -> None:
    from rankopt.plugins.strategies.admm import momentum_horizon

    assert momentum_horizon(0.9) == 10 and momentum_horizon(0.0) == 1 and momentum_horizon(0.5) == 2
    ctx = make_context()
    outcome = rankopt.strategy("admm").run(ctx, {"update_interval": 1, "rho": 50.0, "epochs": 1, "finetune_epochs": 0})
    assert outcome.extra["admm_momentum"] == 0.0  # the per-step form: plain SGD, which converges
    history = ctx.reported["admm_residual_history"]
    assert history[-1] < history[0] and history[-1] < 0.05
    wide = rankopt.strategy("admm").run(make_context(), {"update_interval": 10, "epochs": 1, "finetune_epochs": 0})
    assert wide.extra["admm_momentum"] == 0.9


@pytest.mark.parametrize("decomposer", ["tucker2", "cp", "tt"])
def test_the_defaults_end_under_a_residual_of_0_01(decomposer: str) -> None:
    """Issue 30: with the defaults alone, W ends within 1 % of the low-rank set for each format.

    CP failed this before its projections were warm-started (0.2048: every cold ALS run of
    W + U landed in another local optimum, so Z jumped and W could not follow)."""
    strategy = rankopt.strategy("admm")
    ctx = make_context(decomposers=decomposer)
    outcome = strategy.run(ctx, {"finetune_epochs": 0})
    assert {e["decomposer"] for e in outcome.spec.values()} == {decomposer}
    history = ctx.reported["admm_residual_history"]
    assert history[0] > 0.25  # far from the low-rank set at the start
    assert outcome.extra["admm_final_residual"] < 0.01
    assert max(ctx.reported["admm_final_residuals"].values()) < 0.01
    assert outcome.extra["admm_converged_step"] is not None  # stopped at the tolerance
    assert outcome.extra["accuracy_after_compression"] >= outcome.extra["accuracy_before_compression"] - 0.02


def test_cp_warm_projection_stays_in_the_previous_optimum() -> None:
    """Re-projecting a CP projection from its own factors returns it; a cold start need not."""
    cp = rankopt.decomposer("cp")
    torch.manual_seed(0)
    weight = torch.randn(16, 8, 3, 3)
    z, factors = cp.warm_project(weight, (12,))
    assert torch.allclose(z, cp.project(weight, (12,)), atol=1e-6)  # no start: the cold projection
    again, _ = cp.warm_project(z, (12,), start=factors)
    assert float((again - z).norm() / z.norm()) < 1e-4
    # ALS from scratch on the same rank-12 tensor lands elsewhere (1.2e-2 here)
    assert float((cp.project(z, (12,)) - z).norm() / z.norm()) > 1e-3
    # start factors of another shape or rank: a cold start, not an error
    cold, _ = cp.warm_project(weight, (12,), start=[f[:, :5] for f in factors])
    assert torch.allclose(cold, z, atol=1e-6)


def test_rho_growth_rescales_the_scaled_dual_and_stops_at_its_ceiling() -> None:
    from rankopt.plugins.strategies.admm import next_rho, rho_ceiling

    ctx = make_context()
    model = ctx.model()
    state = ADMMState(model, ctx.select_ranks(model), rho=2.0)
    name = next(iter(state.u))
    state.u[name] = torch.ones_like(state.u[name])
    state.set_rho(4.0)
    assert state.rho == 4.0 and torch.allclose(state.u[name], torch.full_like(state.u[name], 0.5))
    assert rho_ceiling(1.0, 100.0, 0.01) == 100.0 and rho_ceiling(1.0, 100.0, 0.1) == 10.0
    assert rho_ceiling(20.0, 100.0, 0.1) == 20.0  # never under the starting rho
    # rho grows only after an update that stalled (residual above half the previous one)
    assert next_rho(1.0, 0.2, 0.69, 1.5, 100.0) == 1.0
    assert next_rho(1.0, 0.29, 0.23, 1.5, 100.0) == 1.5
    assert next_rho(80.0, 0.29, 0.23, 1.5, 100.0) == 100.0  # the ceiling
    assert next_rho(80.0, 0.29, 0.23, 1.0, 100.0) == 80.0  # rho_growth 1: fixed, as the paper
    strategy = rankopt.strategy("admm")
    assert strategy.defaults()["rho_growth"] == 1.5
    assert strategy.validate_params({"preset": "paper"})["rho_growth"] == 1.0


def test_bad_rho_growth_is_a_clear_error() -> None:
    from rankopt.core.errors import ConfigError

    with pytest.raises(ConfigError, match="rho_growth"):
        rankopt.strategy("admm").validate_params({"rho_growth": 0.5})
