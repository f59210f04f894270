"""Frozen records that the registration hooks return.

They sit below the plugin base classes (which name them), so a factory is typed by
what it returns in its docstring, not by the class.

Each record carries a unique lower-case ``name`` within its family, a factory that
makes the plugin object, and a one-line description shown by ``rankopt plugins``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rankopt.core.errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

__all__ = [
    "PluginRecord",
    "DecomposerInfo",
    "RankSelectorInfo",
    "StrategyInfo",
    "ModelInfo",
    "DatasetInfo",
    "NAME_PATTERN",
]

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]*$")


@dataclass(frozen=True)
class PluginRecord:
    """Common fields of every registration record."""

    name: str
    factory: Callable[..., Any]
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise PluginError(
                f"{type(self).__name__}.name must be a lower-case identifier matching "
                f"{NAME_PATTERN.pattern!r}, got {self.name!r}; rename it, e.g. 'my_method'"
            )
        if not callable(self.factory):
            raise PluginError(
                f"{type(self).__name__} {self.name!r}: factory must be callable "
                f"(a class or a function), got {type(self.factory).__name__}"
            )
        if not isinstance(self.description, str):
            raise PluginError(
                f"{type(self).__name__} {self.name!r}: description must be a string, "
                f"got {type(self.description).__name__}"
            )

    @property
    def summary(self) -> str:
        """The first line of the description."""
        return self.description.strip().splitlines()[0] if self.description.strip() else ""


@dataclass(frozen=True)
class DecomposerInfo(PluginRecord):
    """A decomposer: ``factory()`` returns a :class:`~rankopt.Decomposer`."""

    factory: Callable[[], Any]


@dataclass(frozen=True)
class RankSelectorInfo(PluginRecord):
    """A rank selector: ``factory()`` returns a :class:`~rankopt.RankSelector`."""

    factory: Callable[[], Any]


@dataclass(frozen=True)
class StrategyInfo(PluginRecord):
    """A training strategy: ``factory()`` returns a :class:`~rankopt.Strategy`."""

    factory: Callable[[], Any]


@dataclass(frozen=True)
class ModelInfo(PluginRecord):
    """A model: ``factory(**kwargs)`` returns an ``nn.Module``.

    ``input_shape`` is the shape of one sample (C, H, W) the model expects by default,
    used when a study does not say otherwise.
    """

    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo(PluginRecord):
    """A dataset: ``factory(**kwargs)`` returns :class:`~rankopt.DatasetSplits`."""

    factory: Callable[..., Any]
