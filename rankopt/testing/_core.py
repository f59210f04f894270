"""Check results and the small runner every contract check uses."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from rankopt.core.records import NAME_PATTERN

__all__ = ["CheckResult", "CheckFailed", "Checks", "raise_on_failures", "seeded", "relative_error"]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one contract check: its name, whether it passed, and why.

    A ``skipped`` check did not run (a sample layer ``supports()`` rejects, an optional
    method not provided); it counts as passed, and ``reason`` says why it was skipped.
    """

    check: str
    passed: bool
    reason: str = ""
    skipped: bool = False

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("pass" if self.passed else "FAIL")

    def __str__(self) -> str:
        return f"[{self.status}] {self.check}: {self.reason}"


class CheckFailed(Exception):
    """Raised inside a check body to fail it with a reason."""


class Checks:
    """Collects :class:`CheckResult` objects; a check body returns a reason or raises.

    A body that raises :class:`CheckFailed` fails with its message; any other exception
    fails the check with the exception's type and message, so one broken method never
    hides the results of the others.
    """

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.results: list[CheckResult] = []

    def run(self, check: str, body: Callable[[], str | None]) -> bool:
        try:
            reason = body() or "ok"
        except CheckFailed as exc:
            self.results.append(CheckResult(check, False, str(exc)))
            return False
        except Exception as exc:  # the plugin's own error is the finding
            self.results.append(CheckResult(check, False, f"raised {type(exc).__name__}: {exc}"))
            return False
        self.results.append(CheckResult(check, True, reason))
        return True

    def fail(self, check: str, reason: str) -> None:
        self.results.append(CheckResult(check, False, reason))

    def skip(self, check: str, reason: str) -> None:
        self.results.append(CheckResult(check, True, reason, skipped=True))


def raise_on_failures(subject: str, results: Sequence[CheckResult]) -> None:
    """Raise one AssertionError listing every failed check (for the ``assert_*`` forms)."""
    failed = [r for r in results if not r.passed]
    if failed:
        lines = "\n".join(f"  - {r.check}: {r.reason}" for r in failed)
        raise AssertionError(
            f"{subject} failed {len(failed)} of {len(results)} contract checks:\n{lines}"
        )


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block; restore the caller's torch, NumPy and
    ``random`` states after it (training seeds all three)."""
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / max(||expected||, tiny)`` in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def require(condition: bool, reason: str) -> None:
    if not condition:
        raise CheckFailed(reason)


def require_identity(plugin: Any, base: type) -> None:
    """``plugin`` is an instance of ``base`` and its ``name`` a lower-case identifier."""
    require(isinstance(plugin, base), f"must subclass rankopt.{base.__name__}, got {type(plugin).__name__}")
    require(
        isinstance(plugin.name, str) and bool(NAME_PATTERN.match(plugin.name)),
        f"name must be a lower-case identifier, got {plugin.name!r}",
    )


def require_json(value: Any, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise CheckFailed(f"{what} must be JSON-serializable (it is stored in the run), {exc}") from None
