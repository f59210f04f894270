"""Built-in datasets, one module per source."""

from rankopt.plugins.datasets.base import DatasetSplits

__all__ = ["DatasetSplits", "BUILTIN"]

BUILTIN: tuple[str, ...] = ()
