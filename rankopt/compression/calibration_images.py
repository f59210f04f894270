"""The calibration images a reference carries for sequential decomposition.

``rankopt.calibrate(..., mode="sequential")`` and a study's ``calibration: {mode:
sequential}`` leave them on the model (an attribute, never in a state_dict, shared by
deep copies); ``rankopt.compress`` then fits the layers in forward order
(:mod:`rankopt.compression.sequential`). Kept apart so that calibration, surgery and the
sequential fit import it without a circle.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from rankopt.core.errors import ConfigError

__all__ = ["CALIBRATION_MODES", "MODES_ATTRIBUTE", "attach_images", "calibration_images", "check_mode",
           "check_ridge", "detach_images", "sequential_plan"]

DEFAULT_DAMPING = 0.01
DEFAULT_RIDGE = 0.1  # the regression's shrinkage (rankopt.compression.sequential)
CALIBRATION_MODES = ("independent", "sequential")
# the calibration images a reference carries for sequential decomposition (like ATTRIBUTE)
MODES_ATTRIBUTE = "_rankopt_sequential_calibration"


class _Images:
    """The calibration images and damping a reference carries; shared by deep copies."""

    def __init__(self, images: torch.Tensor, damping: float, ridge: float) -> None:
        self.images = images
        self.damping = damping
        self.ridge = ridge

    def __deepcopy__(self, memo: dict[int, Any]) -> _Images:
        return self


def check_mode(mode: Any) -> str:
    if mode not in CALIBRATION_MODES:
        raise ConfigError(
            f"calibration mode must be one of {list(CALIBRATION_MODES)}, got {mode!r}; "
            "'independent' whitens by the reference's inputs, 'sequential' fits each layer to "
            "the inputs it receives once the earlier layers are compressed"
        )
    return str(mode)


def check_ridge(ridge: Any) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0 < ridge <= 10:
        raise ConfigError(
            f"calibration ridge must be a number in (0, 10], got {ridge!r}; it shrinks each "
            "layer's regression towards its own weight (0.1 by default)"
        )
    return float(ridge)


def calibration_images(batches: Iterable[Any], images: int) -> torch.Tensor:
    """The first ``images`` inputs of ``batches`` (inputs or ``(inputs, targets)``), on the CPU."""
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ConfigError(f"calibration images must be an integer >= 1, got {images!r}")
    chunks, seen = [], 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = x[: images - seen].detach().cpu()
        chunks.append(x)
        seen += x.shape[0]
        if seen >= images:
            break
    if seen == 0:
        raise ConfigError("calibration saw no images: the training split is empty")
    return torch.cat(chunks)


def attach_images(
    model: nn.Module, images: torch.Tensor, damping: float = DEFAULT_DAMPING, ridge: float = DEFAULT_RIDGE
) -> None:
    """Let ``model`` (a reference) carry its calibration images: ``rankopt.compress`` of it
    and of its copies (a study's trials) then fits the layers in forward order."""
    check_ridge(ridge)
    object.__setattr__(model, MODES_ATTRIBUTE, _Images(images, damping, float(ridge)))


def sequential_plan(model: nn.Module) -> tuple[torch.Tensor, float, float] | None:
    """``(images, damping, ridge)`` when ``model`` carries sequential calibration, else None."""
    carried = model.__dict__.get(MODES_ATTRIBUTE)
    return (carried.images, carried.damping, carried.ridge) if isinstance(carried, _Images) else None


def detach_images(model: nn.Module) -> None:
    """Drop the carried images: ``rankopt.compress`` goes back to independent layers."""
    model.__dict__.pop(MODES_ATTRIBUTE, None)
