"""Resume that reproduces: a rerun of an interrupted study gives the front the
uninterrupted run would have given.

* :func:`~rankopt.search.repeats.training_seed`: a trial's training seed follows what it trains (its resolved
  parameters, its fidelity rung and the study seed), not its trial number, so a trial
  rerun under another number, and every multi-fidelity continuation, trains the same model.
* :func:`requeue_lost_trials`: a trial that was interrupted (Ctrl-C, SIGTERM) or died
  with its process (SIGKILL, a crash) is enqueued again with its own parameters, ahead
  of the sampler's next trial (Optuna's ``enqueue_trial``; the new trial records
  ``retry_of``). A trial that died in its own retry is not tried a third time: its
  parameters are what kills the process.
* :func:`dead_streak`: how many trials died in a row since the last completed one; they
  count towards ``max_failures``, so that a plugin that takes the process down ends
  in the max_failures message instead of killing every rerun.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["RETRY_ATTR", "requeue_lost_trials", "dead_streak", "lost_reason",
           "fail_own_running"]

RETRY_ATTR = "retry_of"


def lost_reason(trial: FrozenTrial) -> str | None:
    """``"interrupted"`` or ``"died"`` for a FAIL trial that the run lost rather than the
    trial failing on its own (its parameters deserve another try); else None."""
    from rankopt.search.rundir import INTERRUPTED_REASON
    from rankopt.search.storage import HEARTBEAT_REASON, STALE_REASON

    if trial.state != TrialState.FAIL:
        return None
    reason = trial.user_attrs.get("reason")
    if reason == INTERRUPTED_REASON:
        return "interrupted"
    if reason in (STALE_REASON, HEARTBEAT_REASON):
        return "died"
    return None


def requeue_lost_trials(study: optuna.Study, wanted: int | None = None) -> list[int]:
    """Enqueue again, with their own parameters, the search trials the run lost
    (:func:`lost_reason`) that no trial retries yet, the earliest first; returns their
    numbers. ``wanted``: the study's ``trials`` (None: no count); only as many are
    enqueued as the count still has room for, besides the trials completed, running or
    waiting (a retry the study will never run would stay WAITING for ever).

    Multi-fidelity continuations are not enqueued: the promotion step redoes a
    continuation that did not complete. Call it while no other process sets the study
    up (under the run lock), so that two reruns do not enqueue one trial twice."""
    trials = study.get_trials(deepcopy=False)
    room = None
    if wanted is not None:
        busy = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
                and t.user_attrs.get("continued_from") is None]
        room = max(0, wanted - len(busy))
    by_number = {t.number: t for t in trials}
    retried = {t.user_attrs.get(RETRY_ATTR) for t in trials}
    requeued = []
    for trial in trials:
        why = lost_reason(trial)
        if why is None or trial.number in retried or trial.user_attrs.get("continued_from") is not None:
            continue
        if not trial.params:
            continue  # lost before it asked for its parameters: nothing to repeat
        first = by_number.get(trial.user_attrs.get(RETRY_ATTR, -1))
        if why == "died" and first is not None and lost_reason(first) == "died":
            continue  # died twice with these parameters: a third try would die too
        if room is not None and len(requeued) >= room:
            break
        study.enqueue_trial(dict(trial.params), user_attrs={RETRY_ATTR: trial.number})
        requeued.append(trial.number)
    return requeued


def dead_streak(study: optuna.Study) -> int:
    """The number of trials that died with their process (:func:`lost_reason` ``"died"``)
    since the last trial that completed, by trial number."""
    streak = 0
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number, reverse=True):
        if trial.state == TrialState.COMPLETE:
            break
        if lost_reason(trial) == "died":
            streak += 1
    return streak


def fail_own_running(study: optuna.Study, run_dir: Any) -> list[int]:
    """After an interruption: mark FAIL (``interrupted``) every trial this process still
    has RUNNING (one the signal caught outside its objective, e.g. while Optuna stored its
    result), and clean its folder; returns their numbers. Nothing is left RUNNING for a
    rerun to find."""
    import contextlib
    from pathlib import Path

    from rankopt.search.objective import clean_trial_dir
    from rankopt.search.rundir import INTERRUPTED_REASON
    from rankopt.search.storage import WORKER_ATTR, worker_id

    me = worker_id()
    storage = study._storage
    failed = []
    with contextlib.suppress(Exception):  # the storage may be what was interrupted
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.user_attrs.get(WORKER_ATTR) != me:
                continue
            storage.set_trial_user_attr(trial._trial_id, "reason", INTERRUPTED_REASON)
            if storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                failed.append(trial.number)
                clean_trial_dir(Path(run_dir) / "trials" / str(trial.number), reason=INTERRUPTED_REASON)
    return failed
