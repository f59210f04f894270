"""Built-in decomposers, one module per method."""

from rankopt.contract.decomposer import Decomposer

__all__ = ["Decomposer", "BUILTIN"]

BUILTIN: tuple[str, ...] = (
    "rankopt.plugins.decomposers.tucker2",
    "rankopt.plugins.decomposers.cp",
    "rankopt.plugins.decomposers.tt",
    "rankopt.plugins.decomposers.svd",
)
