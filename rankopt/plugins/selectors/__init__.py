"""Built-in rank selectors, one module per method."""

from rankopt.contract.selector import LayerChoice, RankSelector

__all__ = ["RankSelector", "LayerChoice", "BUILTIN"]

BUILTIN: tuple[str, ...] = (
    "rankopt.plugins.selectors.vbmf",
    "rankopt.plugins.selectors.energy",
    "rankopt.plugins.selectors.approx_ratio",
    "rankopt.plugins.selectors.fixed",
    "rankopt.plugins.selectors.budget",
)
