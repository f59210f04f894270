"""The live display of a running study: trials done, the current front, its best points."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rankopt.search.front import pareto_front_2d

__all__ = ["StudyProgress"]


class StudyProgress:
    """A rich progress bar on stderr; silent when ``enabled`` is False (tests, pipes)."""

    def __init__(self, total: int | None, *, enabled: bool | None = None, baseline: Mapping[str, Any],
                 earlier: Sequence[tuple[float, float]] = ()) -> None:
        """``total``: trials to run now; ``earlier``: (accuracy, params) of the trials a
        previous run completed, counted on the bar and in the front so far."""
        # redirected to a file or pipe: no 80-column limit to cut the bar's text at
        self.console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=240)
        self.enabled = self.console.is_terminal if enabled is None else enabled
        self.baseline = dict(baseline)
        self.earlier = len(earlier)
        self.points: list[tuple[float, float]] = list(earlier)
        self.done = 0
        self.failed = 0
        self._progress: Progress | None = None
        self._task: Any = None
        self.total = total

    def __enter__(self) -> StudyProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]trials"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),  # from this run's own pace (earlier trials add no speed)
                TextColumn("{task.fields[front]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            total = None if self.total is None else self.total + self.earlier
            self._task = self._progress.add_task("trials", total=total, completed=self.earlier,
                                                 front=self.front_text())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def trial_done(self, number: int, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        self.done += 1
        if metrics.get("state") == "COMPLETE":
            self.points.append((float(metrics["accuracy"]), float(metrics["params"])))
        else:
            self.failed += 1
        if self._progress is None:
            return
        self._progress.update(self._task, advance=1, front=self.front_text())

    def front_text(self) -> str:
        """The front so far: its size, best accuracy and smallest model."""
        front = [self.points[i] for i in pareto_front_2d(self.points)]
        best = max(front, default=None)
        smallest = min(front, key=lambda p: p[1], default=None)
        ref_params = float(self.baseline.get("params", 1)) or 1.0
        text = f"front {len(front)}"
        if best is not None and smallest is not None:
            text += (
                f" | best acc {best[0]:.3f} ({ref_params / best[1]:.1f}x)"
                f" | smallest {ref_params / smallest[1]:.1f}x at acc {smallest[0]:.3f}"
            )
        if self.failed:
            text += f" | {self.failed} failed"
        return text if self.points else ""


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
