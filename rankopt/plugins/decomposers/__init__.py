"""Built-in decomposers, one module per method."""

from rankopt.plugins.decomposers.base import Decomposer

__all__ = ["Decomposer", "BUILTIN"]

BUILTIN: tuple[str, ...] = ()
