"""The base class of rank selectors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch.nn as nn
from optuna.distributions import BaseDistribution

if TYPE_CHECKING:  # pragma: no cover
    from rankopt.plugins.decomposers.base import Decomposer
    from rankopt.spectral import SpectralCache
    from rankopt.surgery import LayerInfo

__all__ = ["RankSelector", "LayerChoice"]


@dataclass(frozen=True)
class LayerChoice:
    """The selector's decision for one layer: ranks, or None with the reason it stays full."""

    name: str
    decomposer: str
    ranks: tuple[int, ...] | None
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)


class RankSelector(ABC):
    """Turns a layer's weight (and its cached spectra) into ranks for a decomposer.

    Subclasses set ``name`` and ``description``, implement :meth:`select`, and declare
    the search space of their parameters in :meth:`search_space` (Optuna
    distributions, so the local and the Ray backend sample them alike).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def search_space(self, layers: Sequence[LayerInfo] = ()) -> dict[str, BaseDistribution]:
        """The default search space of this selector's parameters."""
        return {}

    def defaults(self) -> dict[str, Any]:
        """Parameter values used when a study fixes none."""
        return {}

    @abstractmethod
    def select(
        self,
        module: nn.Module,
        decomposer: Decomposer,
        *,
        cache: SpectralCache | None = None,
        name: str | None = None,
        **params: Any,
    ) -> tuple[int, ...]:
        """Ranks for ``decomposer`` on ``module`` (a tuple in the decomposer's order)."""

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check parameter names (and values); unknown names fail, never dropped."""
        return dict(params)
