"""Built-in plugins, registered from an explicit tuple (not from entry points)."""

from rankopt.plugins import datasets, decomposers, models, selectors, strategies

__all__ = ["BUILTIN_PLUGINS"]

BUILTIN_PLUGINS: tuple[str, ...] = (
    *decomposers.BUILTIN,
    *selectors.BUILTIN,
    *strategies.BUILTIN,
    *models.BUILTIN,
    *datasets.BUILTIN,
)
