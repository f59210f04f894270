"""ADMM-regularized training towards low rank (HODEC), then decomposition and fine-tuning.

After Yin et al., HODEC (``seeds/004_*``, Algorithm 2 "ADMM-regularized training"):
solve ``min_W loss(W) s.t. rank(W) <= r*`` with the augmented Lagrangian

    L(W, Z, U) = loss(W) + rho/2 * ||W - Z + U||_F^2      (per target kernel)

by alternating a W-update (the optimizer's steps on ``L``, Z and U held fixed), a
Z-update ``Z = Pi_S(W + U)`` (the trial decomposer's ``project`` onto the set of
rank-``r*`` tensors: TT in the paper, any decomposer here) and a dual update
``U += W - Z`` (then, by default, rho rises if the update stalled). Starting from ``Z = W`` (projected), ``U = 0``, training stops when
the largest relative residual ``||W - Z||_F / ||W||_F`` over the target layers
falls under ``tol``, or at the epoch limit. The nearly low-rank weights are then
decomposed at ``r*`` (little approximation error) and fine-tuned.

The target ranks ``r*`` are selected once, by the trial's selector on the reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.strategies._common import (
    DISTILL_DEFAULTS,
    TrainingStopped,
    distill_params,
    check_choice,
    check_int,
    check_number,
    spec_layers,
)
from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome
from rankopt.core.records import StrategyInfo

__all__ = ["ADMMStrategy", "ADMMState"]

# the smallest interval of the default space: see ADMMStrategy's "Why not every step"
MIN_UPDATE_INTERVAL = 20
DEFAULT_MOMENTUM = 0.9  # rankopt.training.loop.train's default
RHO_GROWTH = 1.5  # rho *= this after a Z/U update that stalled (see "Rising rho")
STALL = 0.5  # an update stalls when it leaves the residual above this share of the last one
RHO_MAX = 100.0  # ... up to this, and never past 1 / lr
SCHEDULES = ("steps", "epoch")  # Z/U every update_interval steps, or once per epoch (the authors' code)


def rho_ceiling(rho: float, rho_max: float, lr: float) -> float:
    """The largest rho the growth reaches: ``rho_max``, but never past ``1 / lr`` (a gradient
    step on the penalty alone, ``lr * rho`` of the gap, must not overshoot), nor under ``rho``."""
    return max(rho, min(rho_max, 1.0 / lr))


def next_rho(rho: float, residual: float, previous: float, growth: float, ceiling: float) -> float:
    """rho after a Z/U update: times ``growth`` (up to ``ceiling``) when the update stalled,
    leaving the residual above ``STALL`` of the previous one; else unchanged."""
    return min(rho * growth, max(rho, ceiling)) if residual > STALL * previous else rho


def momentum_horizon(momentum: float) -> int:
    """``ceil(1 / (1 - momentum))``: the steps momentum SGD takes to follow a moved target."""
    return 1 if momentum <= 0 else math.ceil(1.0 / (1.0 - momentum) - 1e-9)


class ADMMState:
    """The auxiliary variables Z (low-rank copy) and U (scaled dual) of each target kernel.

    They live on the weights' device, so the projections run there too.
    """

    def __init__(self, model: nn.Module, spec: Mapping[str, Mapping[str, Any]], rho: float) -> None:
        self.rho = rho
        self.layers = list(spec_layers(model, spec))
        self.z: dict[str, torch.Tensor] = {}
        self.u: dict[str, torch.Tensor] = {}
        # a decomposer with ``warm_project`` (cp) continues each projection from the last
        # one's factors, so that consecutive Z stay in one local optimum
        self.starts: dict[str, Any] = {}
        with torch.no_grad():
            for name, module, dec, ranks, options in self.layers:
                weight = module.weight.detach()
                self.z[name] = self._project(name, dec, weight, ranks, options)
                self.u[name] = torch.zeros_like(weight)

    def _project(self, name: str, dec: Any, target: torch.Tensor, ranks: Any, options: Any) -> torch.Tensor:
        warm = getattr(dec, "warm_project", None)
        if warm is None:
            return dec.project(target, ranks, options).to(target.dtype)
        projection, self.starts[name] = warm(target, ranks, options, self.starts.get(name))
        return projection.to(target.dtype)

    def set_rho(self, rho: float) -> None:
        """Change the penalty, rescaling the scaled dual ``U = Y / rho`` (Boyd et al. 2011, 3.4.1)."""
        for name in self.u:
            self.u[name] *= self.rho / rho
        self.rho = rho

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``rho/2 * sum ||W - Z + U||^2``, differentiable in W (the extra loss)."""
        total = sum(
            ((model.get_submodule(name).weight - self.z[name] + self.u[name]) ** 2).sum()
            for name, *_ in self.layers
        )
        return 0.5 * self.rho * total  # type: ignore[return-value]

    @torch.no_grad()
    def residuals(self, model: nn.Module) -> dict[str, float]:
        """``||W - Z|| / ||W||`` per layer, for the current W and Z."""
        out = {}
        for name, *_ in self.layers:
            weight = model.get_submodule(name).weight.detach()
            out[name] = float((weight - self.z[name]).norm() / weight.norm().clamp_min(1e-12))
        return out

    @torch.no_grad()
    def update(self, model: nn.Module) -> dict[str, float]:
        """Z = project(W + U); U += W - Z. Returns ``||W - Z|| / ||W||`` per layer."""
        residuals: dict[str, float] = {}
        for name, _module, dec, ranks, options in self.layers:
            weight = model.get_submodule(name).weight.detach()
            self.z[name] = self._project(name, dec, weight + self.u[name], ranks, options)
            gap = weight - self.z[name]
            self.u[name] += gap
            residuals[name] = float(gap.norm() / weight.norm().clamp_min(1e-12))
        return residuals


class ADMMStrategy(Strategy):
    """ADMM low-rank regularized training (HODEC), then decompose at the target ranks and fine-tune.

    Hyperparameters:
        rho: the penalty parameter of the augmented Lagrangian; larger pulls W to
            the low-rank set faster, at the cost of the task loss.
        rho_growth: rho's factor after a stalled Z/U update (1: fixed rho); see "Rising rho".
        rho_max: the largest rho the growth reaches (also bounded by ``1 / lr``).
        schedule: ``"steps"`` (default): Z/U every ``update_interval`` optimizer steps;
            ``"epoch"``: Z/U once per epoch, as the authors' public code does (the
            interval is then the epoch's batch count). Both are in the default space.
        update_interval: optimizer steps between two Z/U updates under ``"steps"``
            (HODEC's sketch updates after every step; the default space starts at 20,
            see below). An interval shorter than the momentum horizon
            ``1 / (1 - momentum)`` (10 at the training default 0.9) runs the regularized
            phase with plain SGD (momentum 0), the measured rule under which W follows
            the dual (plain SGD updating every step converges for Tucker-2 when
            ``lr * rho`` is near 1: 0.5 brought small_cnn's residual 0.30 -> under 0.05
            in one epoch on digits; at 0.01 it grows, 0.30 -> 0.45).
        epochs: the limit of regularized training epochs.
        tol: stop once ``max over layers ||W - Z|| / ||W||`` is below it.
        lr: learning rate of both phases.
        finetune_epochs: fine-tuning of the compressed model (0 skips it).

    Why not every step. The scaled dual update ``U += W - Z`` assumes the W-update has
    (nearly) minimized ``L``. Here the W-update is ``update_interval`` SGD steps; on the
    penalty alone each closes a share of about ``lr * rho / (1 - momentum)`` of the gap
    ``W - (Z - U)`` (0.1 at lr 0.01, rho 1, Nesterov 0.9), while the dual adds the whole
    gap at every update: at interval 1 the dual outruns W tenfold, U grows and drags
    ``Z = Pi(W + U)`` away (small_cnn on digits, lr 0.01, rho 1, tucker2 at 0.25 of the
    largest ranks: residual 0.85 -> 2.7, tt 0.97 -> 2.5, accuracy after compression 0.10).
    Damping the dual step by that share, with a constant lr, did not cure it (the
    momentum adds its own lag; tucker2 oscillated, tt went 0.97 -> 0.83 at accuracy
    0.10). An update so needs
    ``update_interval * lr * rho / (1 - momentum)`` of at least about 1, with margin for
    the cosine schedule that shrinks lr later (tt at energy p=0.95 ranks: at interval 10
    the residual reached 0.009, then drifted back to 0.1 as lr decayed; at 20 it ended
    at 0.003). The default range is
    therefore 20-200 and the default 20. Settings with a small ``lr * rho`` need a larger
    interval; HODEC raises rho during training for the same reason.

    Rising rho. ``rho_growth`` (default 1.5): after a Z/U update that leaves the residual
    above half the previous one (progress stalled), rho is multiplied by it, up to
    ``rho_max`` (default 100) and never past ``1 / lr`` (a plain gradient step on the
    penalty, ``lr * rho`` of the gap, must not overshoot); the scaled dual is rescaled
    ``U *= rho_old / rho_new`` so the unscaled multiplier is unchanged (Boyd et al. 2011,
    3.4.1; the varying penalty of ADMM pruning work). Why only on a stall: growing after
    every update hurt short runs (digits, 2 updates: tucker2 0.0029 -> 0.0076, cp 0.0093 ->
    0.0235 at x1.5; x1.2 left cp at 0.015), since a shrunken U stops W short of Z, while with
    fixed rho W oscillates around Z - U (momentum) and long runs stall (LeNet-5/MNIST at 0.25
    ranks, tt: 0.0499 after 12 updates at fixed rho, 0.0084 after 10 with stall growth x1.5;
    x1.2 left 0.016). ``rho_growth: 1`` keeps rho fixed, as the paper does.

    CP's projection is ALS, a local search: run from scratch on every ``W + U`` it can land
    in another local optimum, so Z jumps and W cannot follow (digits, defaults: residual
    0.2048 after 2 updates). Z is therefore warm-started from the previous Z's factors (the
    decomposer's ``warm_project``, used where a decomposer offers it): 0.0093. Tucker-2 and
    TT projections are truncated SVDs, consistent without it.

    ``preset: paper``: the authors' schedule, Z/U once per epoch, rho 1e-3 fixed
    (``rho_growth: 1``), lr 0.1, plain cross-entropy. What the default adds: a per-step schedule at rho 1 (the residual
    reaches the tolerance within a short trial; at rho 1e-3 it barely moves in 2 epochs),
    searched rho/lr/schedule, and distillation in the fine-tuning (docs/methods.md).
    """

    name = "admm"
    description = "ADMM low-rank regularized training (HODEC), then decompose and fine-tune"

    def search_space(self) -> dict[str, BaseDistribution]:
        return {
            "rho": FloatDistribution(1e-2, 10.0, log=True),
            "schedule": CategoricalDistribution(list(SCHEDULES)),
            "update_interval": IntDistribution(MIN_UPDATE_INTERVAL, 200, log=True),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    def paper_preset(self) -> dict[str, Any]:
        # the authors' code (HODEC): Z and U once per epoch, rho 1e-3, lr 0.1, plain
        # cross-entropy in the fine-tuning (no distillation)
        return {
            "schedule": "epoch", "rho": 1e-3, "rho_growth": 1.0, "lr": 0.1, "distill_weight": 0.0, "distill_features": 0.0,
        }

    def paper_search_space(self) -> dict[str, BaseDistribution]:
        return {}

    def defaults(self) -> dict[str, Any]:
        return {
            "schedule": "steps",
            "rho": 1.0,
            "rho_growth": RHO_GROWTH,
            "rho_max": RHO_MAX,
            "update_interval": MIN_UPDATE_INTERVAL,
            "epochs": 2.0,
            "tol": 0.01,
            "lr": 0.01,
            "finetune_epochs": 1.0,
            **DISTILL_DEFAULTS,
        }

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        hp = super().validate_params(params)
        return {
            "schedule": check_choice(self.name, "schedule", hp["schedule"], SCHEDULES),
            "rho": check_number(self.name, "rho", hp["rho"], low=0.0, low_open=True),
            "rho_growth": check_number(self.name, "rho_growth", hp["rho_growth"], low=1.0),
            "rho_max": check_number(self.name, "rho_max", hp["rho_max"], low=0.0, low_open=True),
            "update_interval": check_int(self.name, "update_interval", hp["update_interval"], low=1),
            "epochs": check_number(self.name, "epochs", hp["epochs"], low=0.0),
            "tol": check_number(self.name, "tol", hp["tol"], low=0.0, high=1.0, low_open=True),
            "lr": check_number(self.name, "lr", hp["lr"], low=0.0, low_open=True),
            "finetune_epochs": check_number(
                self.name, "finetune_epochs", hp["finetune_epochs"], low=0.0
            ),
            **distill_params(self.name, hp),
        }

    def run(self, ctx: TrialContext, params: Mapping[str, Any]) -> TrialOutcome:
        hp = self.validate_params(params)
        model = ctx.model()
        spec = ctx.select_ranks(model)
        state = ADMMState(model, spec, hp["rho"])
        # the largest relative residual ||W - Z|| / ||W||: at the start, then after each update
        history: list[float] = [max(state.residuals(model).values(), default=0.0)]
        converged_step: int | None = None

        per_epoch = getattr(ctx, "steps_per_epoch", None)
        interval = hp["update_interval"]
        if hp["schedule"] == "epoch":
            if per_epoch is None:
                raise ConfigError(
                    "strategy 'admm': schedule 'epoch' needs the trial context's steps_per_epoch, "
                    f"which {type(ctx).__name__} does not offer; use schedule 'steps'"
                )
            interval = int(per_epoch)
        train_options: dict[str, Any] = {}
        momentum = float(getattr(ctx, "train_options", {}).get("momentum", DEFAULT_MOMENTUM))
        if interval < momentum_horizon(momentum):
            train_options["momentum"] = 0.0  # W must follow the dual within one interval

        rho_cap = rho_ceiling(hp["rho"], hp["rho_max"], hp["lr"])
        rhos = [state.rho]

        def on_step(net: nn.Module, step: int) -> None:
            nonlocal converged_step
            if step % interval != 0:
                return
            history.append(max(state.update(net).values(), default=0.0))
            if history[-1] < hp["tol"]:
                converged_step = step
                raise TrainingStopped(step)
            state.set_rho(next_rho(state.rho, history[-1], history[-2], hp["rho_growth"], rho_cap))
            rhos.append(state.rho)

        if hp["epochs"] > 0 and state.layers:
            try:
                ctx.train(
                    model,
                    epochs=hp["epochs"],
                    lr=hp["lr"],
                    extra_loss=state.penalty,
                    step_callback=on_step,
                    **train_options,
                )
            except TrainingStopped:
                pass
        extra: dict[str, Any] = {
            "admm_update_interval": interval,
            "admm_momentum": train_options.get("momentum", momentum),
            "admm_updates": len(history) - 1,
            "admm_final_rho": state.rho,
            "admm_final_residual": history[-1],
            "admm_converged_step": converged_step,
            "accuracy_before_compression": ctx.evaluate(model),
        }
        compressed = ctx.compress(model, spec)
        extra["accuracy_after_compression"] = ctx.evaluate(compressed)
        if hp["finetune_epochs"] > 0:
            ctx.train(compressed, epochs=hp["finetune_epochs"], lr=hp["lr"], **distill_params(self.name, hp))
        ctx.report(
            admm_residual_history=history,
            admm_rho_history=rhos,
            admm_final_residuals=state.residuals(model),
            admm_converged_step=converged_step,
        )
        return TrialOutcome(model=compressed, spec=spec, extra=extra)


@hookimpl
def rankopt_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("admm", ADMMStrategy, ADMMStrategy.description)]
