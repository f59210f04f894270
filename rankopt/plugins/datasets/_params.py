"""Parameter checking shared by the built-in dataset and model factories.

Factories are called with keyword arguments from study files, so an unknown or
misspelled parameter must fail with the plugin's name and the accepted parameters,
never be dropped.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

from rankopt.core.errors import ConfigError

__all__ = ["ParameterError", "checked_params", "check_fraction", "check_positive_int", "accepted"]

F = TypeVar("F", bound=Callable[..., Any])


class ParameterError(ConfigError, TypeError):
    """A factory got an unknown parameter or a missing required one.

    A :class:`ConfigError` (the CLI exits with status 2) that is also a ``TypeError``,
    the exception Python raises for a bad keyword argument.
    """


def accepted(fn: Callable[..., Any]) -> list[str]:
    """The keyword parameters ``fn`` accepts, in declaration order."""
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def checked_params(kind: str, name: str) -> Callable[[F], F]:
    """Wrap a factory so that bad keyword arguments name the plugin and its parameters."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as exc:
                allowed = accepted(fn)
                unknown = sorted(k for k in kwargs if k not in allowed)
                what = (
                    f"unknown parameter(s) {', '.join(map(repr, unknown))}"
                    if unknown
                    else f"bad arguments ({exc})"
                )
                raise ParameterError(
                    f"{kind} {name!r} got {what}; it accepts: {', '.join(allowed)}. "
                    "Fix the spelling or remove the parameter"
                ) from None
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def check_fraction(
    owner: str, field: str, value: Any, *, allow_zero: bool = True, upper: float = 1.0
) -> float:
    """``value`` as a float in [0, upper) (or (0, upper)), else a ConfigError naming it."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
        and value < upper
    )
    if not ok:
        low = "[0" if allow_zero else "(0"
        raise ConfigError(f"{owner}: {field} must be a number in {low}, {upper:g}), got {value!r}")
    return float(value)


def check_positive_int(owner: str, field: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int >= minimum, else a ConfigError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{owner}: {field} must be an integer >= {minimum}, got {value!r}")
    return value
