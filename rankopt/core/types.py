"""The small data types the plugin contract names, below every layer that makes them.

:class:`Cost` is computed by :mod:`rankopt.compression.accounting`, :class:`LayerInfo` and
``Spec`` by :mod:`rankopt.compression.surgery`, :class:`TrainResult` by the training loop;
the base classes of the plugin families take and return them, so they live here, and
those modules re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = ["Cost", "LayerInfo", "Spec", "TrainResult", "SpectralSource"]

Spec = dict[str, dict[str, Any]]
"""The per-layer compression spec: qualified layer name -> decomposer name, ranks, options."""


@dataclass(frozen=True, order=True)
class Cost:
    """Parameters and FLOPs (for one forward pass at a given input size)."""

    params: int
    flops: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.params + other.params, self.flops + other.flops)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.params - other.params, self.flops - other.flops)

    def ratio(self, other: Cost) -> tuple[float, float]:
        """(params, flops) of ``other`` divided by those of ``self`` (compression ratios)."""
        return (
            other.params / self.params if self.params else float("inf"),
            other.flops / self.flops if self.flops else float("inf"),
        )


@dataclass(frozen=True)
class LayerInfo:
    """A compressible layer of a model, as seen at a given input size."""

    name: str
    kind: str  # "conv2d" or "linear"
    in_channels: int  # S (in_features for Linear)
    out_channels: int  # T (out_features for Linear)
    kernel_size: tuple[int, int]  # (1, 1) for Linear
    stride: tuple[int, int] = (1, 1)
    groups: int = 1
    input_hw: tuple[int, int] | None = None  # spatial size of its input; None for Linear
    cost: Cost = field(default=Cost(0, 0))

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)


@dataclass
class TrainResult:
    """What one call of :func:`train` did.

    ``losses`` holds the mean training loss (task loss plus ``extra_loss``) of each
    epoch, the last one possibly partial; ``epochs`` is ``steps / len(loader)``;
    ``lrs`` the learning rate of the first step of each (partial) epoch.
    """

    steps: int
    epochs: float
    final_loss: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    lrs: list[float] = field(default_factory=list)


class SpectralSource(Protocol):
    """Where a rank selector gets a weight matrix's spectrum (:class:`rankopt.SpectralCache`)."""

    def svd(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def singular_values(self, matrix: torch.Tensor) -> torch.Tensor: ...
