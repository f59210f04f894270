"""The end of a study's run: the plugins' hooks, the errors for a run whose trials failed,
and the message after Ctrl-C."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from rankopt.config.schema import StudyConfig
from rankopt.core.errors import RankoptError

__all__ = ["call_trial_hook", "call_study_hook", "check_failures", "interrupted_message"]


def call_trial_hook(run_dir: Path, number: int, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
    """``rankopt_trial_finished`` of every plugin (the traceback left out of the metrics)."""
    from rankopt.contract.manager import get_registry

    hook_metrics = {k: v for k, v in metrics.items() if k not in ("traceback",)}
    get_registry().pm.hook.rankopt_trial_finished(
        run_dir=run_dir, trial_number=number, params=dict(values), metrics=hook_metrics
    )


def call_study_hook(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """``rankopt_study_finished`` of every plugin."""
    from rankopt.contract.manager import get_registry

    get_registry().pm.hook.rankopt_study_finished(run_dir=run_dir, summary=dict(summary))


def check_failures(study: optuna.Study, config: StudyConfig, outcomes: Sequence[str], run_dir: Path,
                   *, dead: int = 0) -> None:
    """Raise when this run's trials (their states, ``outcomes``) and the ``dead`` trials
    found at its start (died with their process since the last completed trial) reached
    ``max_failures``, or when none of this run's trials completed; the message names the
    last failure's reason."""
    failed = outcomes.count("FAIL") + dead
    too_many = config.max_failures is not None and failed >= config.max_failures
    if not too_many and not (outcomes and all(s != "COMPLETE" for s in outcomes)):
        return
    reasons = [t.user_attrs.get("reason", "?")
               for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    last = reasons[-1] if reasons else "?"
    if too_many and dead:
        raise RankoptError(
            f"study {config.name!r} stopped: {dead} trial(s) took their process down in a row "
            f"(found dead at the start of this run) and {outcomes.count('FAIL')} of this run's "
            f"{len(outcomes)} trials failed (max_failures: {config.max_failures}); the last "
            f"reason: {last}. A plugin that crashes the interpreter (os._exit, a segfault) "
            "does this: set isolate: process in the study file to fail only its trial, fix "
            f"the plugin, or raise max_failures to go on (see {run_dir}/trials/*/metrics.json)"
        )
    if too_many:
        raise RankoptError(
            f"study {config.name!r} stopped: {failed} of its "
            f"{len(outcomes)} trials in this run failed (max_failures: "
            f"{config.max_failures}); the last reason: {last}. "
            f"Completed trials are kept; fix the cause and rerun to continue (see "
            f"{run_dir}/trials/*/metrics.json)"
        )
    raise RankoptError(
        f"all {len(outcomes)} trials of study {config.name!r} failed; the last reason: "
        f"{last} (see {run_dir}/trials/*/metrics.json)"
    )


def interrupted_message(config: StudyConfig, run_dir: Path) -> str:
    """What a run interrupted by Ctrl-C or SIGTERM says: how many trials are complete."""
    done = "?"
    with contextlib.suppress(Exception):  # the storage may be what was interrupted
        from rankopt.search.layout import storage_url_of
        from rankopt.search.storage import open_storage

        url = storage_url_of(config, run_dir)
        try:
            study = optuna.load_study(study_name=config.name, storage=open_storage(url))
            done = str(len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
        except KeyError:  # interrupted before the study was created
            done = "0"
    from rankopt.search.objective import INTERRUPT_SIGNAL

    by = f" by {INTERRUPT_SIGNAL[0]}" if INTERRUPT_SIGNAL and INTERRUPT_SIGNAL[0] != "SIGINT" else ""
    return f"Interrupted{by}: {done} trials complete; rerun the same command to continue"
