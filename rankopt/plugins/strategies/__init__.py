"""Built-in training strategies, one module per method."""

from rankopt.plugins.strategies.base import Strategy, TrialContext, TrialOutcome

__all__ = ["Strategy", "TrialContext", "TrialOutcome", "BUILTIN"]

BUILTIN: tuple[str, ...] = ()
