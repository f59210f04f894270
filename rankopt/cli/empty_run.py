"""One clear line for a run directory that has no finished trial yet (interrupted before
any trial finished, or still training its reference): every command that reads trials
says so instead of an empty table, a missing-file error or a misleading hint."""

from __future__ import annotations

from typing import Any

__all__ = ["empty_run_message", "refuse_empty_run"]


def empty_run_message(result: Any) -> str | None:
    """The line to print when ``result`` (a StudyResult) has no completed trial; else None."""
    from optuna.trial import TrialState

    from rankopt.core.errors import ConfigError
    from rankopt.results.reading import reference_path

    try:
        trials = result.study.get_trials(deepcopy=False)
    except ConfigError:
        trials = []  # no study in the storage yet: nothing ran
    if any(t.state == TrialState.COMPLETE for t in trials):
        return None
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    states = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none started"
    stage = ("reference trained" if reference_path(result.run_dir).is_file()
             else "reference not trained yet")
    return (f"run {str(result.run_dir)!r} has no finished trial yet ({stage}; trials: {states}): "
            f"it was interrupted or is still running; continue it with `rankopt run STUDY.yaml "
            f"--run-dir {result.run_dir}`")


def refuse_empty_run(result: Any) -> None:
    """Raise the one-line ConfigError (exit 2) for a run with no finished trial."""
    from rankopt.core.errors import ConfigError

    message = empty_run_message(result)
    if message is not None:
        raise ConfigError(message)
