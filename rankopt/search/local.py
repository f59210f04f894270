"""The embedded backend: Optuna in this process, trials one after another (or in threads)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from rankopt.search.objective import (
    TrialEnv,
    objective_values,
    run_trial,
    set_constraints,
    user_attrs,
)

__all__ = ["run_local", "TrialFailed", "quiet_optuna"]

log = logging.getLogger("rankopt.study")

TrialDone = Callable[[int, Mapping[str, Any], Mapping[str, Any]], None]


class TrialFailed(Exception):
    """A trial that ended in a failure recorded in its metrics (Optuna marks it FAIL)."""


class quiet_optuna:
    """Keep Optuna's per-trial INFO/WARNING lines out of the output while rankopt reports."""

    def __enter__(self) -> None:
        self._level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        optuna.logging.set_verbosity(self._level)


def run_local(
    env: TrialEnv,
    study: optuna.Study,
    *,
    n_trials: int | None,
    timeout: float | None,
    n_jobs: int = 1,
    on_trial_done: TrialDone | None = None,
) -> None:
    """Run up to ``n_trials`` new trials (and/or until ``timeout`` seconds) into ``study``."""
    finished: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}

    def objective(trial: optuna.Trial) -> list[float]:
        values = env.space.suggest(trial)
        metrics = run_trial(env, trial.number, values)
        for key, value in user_attrs(metrics).items():
            trial.set_user_attr(key, value)
        set_constraints(trial, env.config, metrics)
        finished[trial.number] = (values, metrics)
        if metrics["state"] != "COMPLETE":
            log.warning("trial %d failed: %s", trial.number, metrics.get("reason"))
            raise TrialFailed(metrics.get("reason", "failed"))
        return objective_values(metrics, env.config.objectives)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial_done is not None and trial.number in finished:
            values, metrics = finished.pop(trial.number)
            on_trial_done(trial.number, values, metrics)

    with quiet_optuna():
        study.optimize(
            objective,
            n_trials=n_trials,
            timeout=timeout,
            n_jobs=n_jobs,
            catch=(TrialFailed,),
            callbacks=[callback],
            gc_after_trial=False,
        )
