"""The base class of training strategies and the context a trial offers them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn as nn
from optuna.distributions import BaseDistribution

from rankopt.core.types import LayerInfo, Spec, TrainResult

__all__ = ["Strategy", "TrialContext", "TrialOutcome"]


@dataclass
class TrialOutcome:
    """What a strategy returns: the compressed model, its spec, and extra metrics."""

    model: nn.Module
    spec: dict[str, dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TrialContext(Protocol):
    """What a trial offers its strategy. The study provides it; tests may fake it."""

    device: torch.device
    seed: int
    targets: Sequence[LayerInfo]  # the compressible layers the study targets

    def model(self) -> nn.Module:
        """A fresh copy of the trained reference model, on ``device``."""

    def train(
        self,
        model: nn.Module,
        *,
        epochs: float,
        lr: float,
        extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
        step_callback: Callable[[nn.Module, int], None] | None = None,
        **options: Any,
    ) -> TrainResult:
        """Train ``model`` in place on the training split."""

    def evaluate(self, model: nn.Module) -> float:
        """Top-1 accuracy on the validation split, in [0, 1]."""

    def select_ranks(self, model: nn.Module) -> Spec:
        """A compression spec for ``model``'s target layers from the trial's selector and decomposers."""

    def compress(self, model: nn.Module, spec: Mapping[str, Mapping[str, Any]]) -> nn.Module:
        """A compressed copy of ``model`` (see :func:`rankopt.compress`)."""

    def report(self, **metrics: Any) -> None:
        """Record extra metrics of the trial (learned ranks, residuals, ...)."""


class Strategy(ABC):
    """Drives one trial: optional preparation, rank selection, compression, fine-tuning.

    Subclasses set ``name`` and ``description``, declare their hyperparameters in
    :meth:`search_space` (Optuna distributions) and :meth:`defaults`, and implement
    :meth:`run`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # True when run() selects ranks on the reference before any training: two trials
    # whose selectors give the same ranks there train the same model (see skip_repeats)
    selects_on_reference: ClassVar[bool] = False

    def search_space(self) -> dict[str, BaseDistribution]:
        """The default search space of this strategy's hyperparameters."""
        return {}

    def paper_preset(self) -> dict[str, Any]:
        """The fixed hyperparameters of ``preset: paper``: the paper's own recipe (loss,
        schedule, training length as far as the paper gives them; no distillation).
        Empty: the strategy has no paper preset."""
        return {}

    def paper_search_space(self) -> dict[str, BaseDistribution]:
        """The ranges ``preset: paper`` searches: those the paper gives (others are fixed)."""
        return {}

    def search_space_for(self, configured: Mapping[str, Any]) -> dict[str, BaseDistribution]:
        """The search space under the study's ``configured`` parameters (``preset`` picks it)."""
        if self.preset_of(configured) == "paper":
            return self.paper_search_space()
        return self.search_space()

    def preset_of(self, params: Mapping[str, Any]) -> str:
        """The ``preset`` named in ``params`` ("default" when none), checked."""
        from rankopt.core.errors import ConfigError

        preset = params.get("preset", "default")
        allowed = ["default", "paper"] if self.paper_preset() else ["default"]
        if preset not in allowed:
            raise ConfigError(
                f"strategy {self.name!r}: hyperparameter 'preset' must be one of {allowed}, got {preset!r}"
            )
        return str(preset)

    def defaults(self) -> dict[str, Any]:
        """Hyperparameter values used when a study fixes and searches none."""
        return {}

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults and reject unknown hyperparameter names (never drop them)."""
        from rankopt.core.errors import ConfigError

        known = set(self.defaults()) | set(self.search_space()) | {"preset"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(
                f"strategy {self.name!r} has no hyperparameter(s) {unknown}; "
                f"known are {sorted(known)}"
            )
        preset = self.paper_preset() if self.preset_of(params) == "paper" else {}
        merged = {**self.defaults(), **preset, **dict(params)}
        merged.pop("preset", None)
        return merged

    @abstractmethod
    def run(self, ctx: TrialContext, params: Mapping[str, Any]) -> TrialOutcome:
        """Run one trial and return the compressed model with its spec."""
