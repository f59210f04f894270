"""Fine-tune after decomposition: the plain baseline every other strategy is measured against.

Select ranks on the trained reference, decompose (the factors are initialized from
the reference weights, as in the Tucker/CP decomposition recipe of
``seeds/001_*`` and the fine-tuning phase of NRMF, ``seeds/000_*``), then train the
compressed model for ``epochs`` at learning rate ``lr``. ``epochs: 0`` measures the
accuracy straight after decomposition ("Acc (No FT)" in those tables).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optuna.distributions import BaseDistribution, FloatDistribution

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.strategies._common import DISTILL_DEFAULTS, distill_params
from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome
from rankopt.core.records import StrategyInfo

__all__ = ["FineTuneStrategy"]

OPTIMIZERS = ("sgd", "adam")


class FineTuneStrategy(Strategy):
    """Select ranks on the reference, compress, fine-tune for ``epochs`` at ``lr``.

    Hyperparameters:
        epochs: fine-tuning epochs (float; fractions allowed, 0 skips fine-tuning).
        lr: the fine-tuning learning rate (searched on a log scale by default, since
            the recipes use 1e-5 .. 1e-2 depending on the optimizer).
        optimizer: ``"sgd"`` (momentum, as in the seed recipes) or ``"adam"``.
    """

    name = "finetune"
    selects_on_reference = True
    description = "Select ranks on the reference, decompose, fine-tune for E epochs at lr"

    def search_space(self) -> dict[str, BaseDistribution]:
        return {"lr": FloatDistribution(1e-4, 1e-1, log=True)}

    def defaults(self) -> dict[str, Any]:
        return {"epochs": 1.0, "lr": 0.01, "optimizer": "sgd", **DISTILL_DEFAULTS}

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        out = super().validate_params(params)
        epochs, lr, optimizer = out["epochs"], out["lr"], out["optimizer"]
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs >= 0:
            raise ConfigError(
                f"strategy 'finetune': epochs must be a number >= 0, got {epochs!r}"
            )
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ConfigError(f"strategy 'finetune': lr must be a number > 0, got {lr!r}")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"strategy 'finetune': optimizer must be one of {list(OPTIMIZERS)}, "
                f"got {optimizer!r}"
            )
        out.update(distill_params(self.name, out))
        return out

    def run(self, ctx: TrialContext, params: Mapping[str, Any]) -> TrialOutcome:
        hp = self.validate_params(params)
        reference = ctx.model()
        spec = ctx.select_ranks(reference)
        model = ctx.compress(reference, spec)
        extra: dict[str, Any] = {}
        if hp["epochs"] > 0:
            extra["accuracy_before_finetune"] = ctx.evaluate(model)
            result = ctx.train(
                model, epochs=float(hp["epochs"]), lr=float(hp["lr"]), optimizer=hp["optimizer"],
                **distill_params(self.name, hp),
            )
            extra["finetune_steps"] = int(result.steps)
            extra["finetune_final_loss"] = float(result.final_loss)
        return TrialOutcome(model=model, spec=spec, extra=extra)


@hookimpl
def rankopt_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("finetune", FineTuneStrategy, FineTuneStrategy.description)]
