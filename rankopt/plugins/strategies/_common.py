"""Helpers shared by the paper strategies (NRMF, DeepTwist, ADMM, TDLRT).

Parameter checks give one error per bad value, naming the strategy, the
hyperparameter, the rule and the value received, before any training starts.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from rankopt.training.distill import DISTILL_DEFAULTS, check_distill_params
from rankopt.core.errors import ConfigError
from rankopt.contract.decomposer import Decomposer

__all__ = [
    "check_number",
    "check_int",
    "check_choice",
    "check_bool",
    "channel_unfoldings",
    "spec_layers",
    "TrainingStopped",
    "distill_params",
    "DISTILL_DEFAULTS",
]


def _is_number(value: Any) -> bool:
    return (
        not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    )


def check_number(
    strategy: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float, or a :class:`ConfigError` stating the allowed interval."""
    ok = _is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            rule = f"{'>' if low_open else '>='} {low:g}"
        else:
            rule = f"{'<' if high_open else '<='} {high:g}"
        raise ConfigError(
            f"strategy {strategy!r}: hyperparameter {name!r} must be a finite number {rule}, "
            f"got {value!r}"
        )
    return float(value)


def check_int(strategy: str, name: str, value: Any, *, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], or a :class:`ConfigError`."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rule = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(
            f"strategy {strategy!r}: hyperparameter {name!r} must be an integer {rule}, "
            f"got {value!r}"
        )
    return int(value)


def check_choice(strategy: str, name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(
            f"strategy {strategy!r}: hyperparameter {name!r} must be one of "
            f"{list(choices)}, got {value!r}"
        )
    return str(value)


def check_bool(strategy: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(
            f"strategy {strategy!r}: hyperparameter {name!r} must be true or false, got {value!r}"
        )
    return value


def channel_unfoldings(weight: torch.Tensor) -> list[torch.Tensor]:
    """The matrices whose ranks Tucker-2 reduces, as differentiable views of ``weight``.

    A conv kernel ``(T, S, kh, kw)`` gives its output-channel unfolding ``T x S*kh*kw``
    and its input-channel unfolding ``S x T*kh*kw`` (the S/R3 and T/R4 modes of NRMF's
    table); a Linear weight ``(out, in)`` is its own single matrix. The spatial modes
    (at most kh*kw wide) are left alone since no built-in decomposer truncates them.
    """
    if weight.dim() == 2:
        return [weight]
    out_channels, in_channels = weight.shape[:2]
    return [
        weight.reshape(out_channels, -1),
        weight.transpose(0, 1).reshape(in_channels, -1),
    ]


def spec_layers(
    model: nn.Module, spec: Mapping[str, Mapping[str, Any]]
) -> Iterator[tuple[str, nn.Module, Decomposer, tuple[int, ...], dict[str, Any] | None]]:
    """``(name, module, decomposer, ranks, options)`` for each layer of a compression spec."""
    from rankopt.contract.manager import get_registry

    registry = get_registry()
    for name, entry in spec.items():
        dec = registry.create("decomposers", entry["decomposer"])
        options = dict(entry["options"]) if entry.get("options") else None
        yield name, model.get_submodule(name), dec, tuple(int(r) for r in entry["ranks"]), options


class TrainingStopped(Exception):
    """Raised from a ``step_callback`` to end a ``ctx.train`` call early.

    The shared training loop has no stop signal of its own; ADMM raises this once its
    residual is under the tolerance and catches it around ``ctx.train``.
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"training stopped at step {step}")
        self.step = step


def distill_params(strategy: str, hp: Mapping[str, Any]) -> dict[str, float]:
    """The checked distillation hyperparameters of ``hp`` (defaults filled in): every
    fine-tuning strategy passes them to its final ``ctx.train`` (see :mod:`rankopt.training.distill`)."""
    out = {k: hp.get(k, v) for k, v in DISTILL_DEFAULTS.items()}
    check_distill_params(f"strategy {strategy!r}", out)
    return {k: float(v) for k, v in out.items()}
