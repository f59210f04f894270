"""Built-in rank selectors, one module per method."""

from rankopt.plugins.selectors.base import LayerChoice, RankSelector

__all__ = ["RankSelector", "LayerChoice", "BUILTIN"]

BUILTIN: tuple[str, ...] = ()
