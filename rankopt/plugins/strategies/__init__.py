"""Built-in training strategies, one module per method."""

from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome

__all__ = ["Strategy", "TrialContext", "TrialOutcome", "BUILTIN"]

BUILTIN: tuple[str, ...] = (
    "rankopt.plugins.strategies.finetune",
    "rankopt.plugins.strategies.nrmf",
    "rankopt.plugins.strategies.deeptwist",
    "rankopt.plugins.strategies.admm",
    "rankopt.plugins.strategies.tdlrt",
)
