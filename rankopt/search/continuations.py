"""Continuations (multi_fidelity) that several drivers share exactly.

* A continuation is claimed in the storage like a searched trial: it is created with its
  ``continued_from`` in the same transaction (Optuna's ``create_new_trial`` with a
  template), and of the claims on one source the lowest trial number wins; the others
  are withdrawn (PRUNED) before any work. Every driver reads the same numbers from the
  storage, so two drivers never continue the same source.
* A rung is promoted once it is full: a driver that finished its share waits (failing
  the trials of dead workers as their leases expire) until no trial of the rung is
  still running elsewhere, so every driver ranks the same trials and picks the same
  sources.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["finished_elsewhere", "claim_continuation", "wait_for_rung", "rung_running", "CLAIM_LOST_REASON"]

log = logging.getLogger("rankopt.study")

CLAIM_LOST_REASON = "withdrawn: another worker claimed the continuation of this source first"
POLL_S = 2.0


def finished_elsewhere(exc: BaseException) -> bool:
    """True for Optuna's error on telling (or writing to) a trial that another worker
    already finished: it judged this worker dead and failed the trial."""
    if isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
        return True
    return isinstance(exc, ValueError) and str(exc).startswith("Cannot tell a ")


def claim_continuation(study: optuna.Study, source: FrozenTrial, fidelity: int) -> optuna.Trial | None:
    """A RUNNING trial with ``source``'s parameters that continues it at ``fidelity``, or
    None when another worker claimed that source first (its claim is then withdrawn)."""
    from rankopt.search.storage import WORKER_ATTR, _heartbeat_on, worker_id

    storage = study._storage
    template = optuna.trial.create_trial(
        state=TrialState.RUNNING, params=dict(source.params),
        distributions=dict(source.distributions),
        # named for this process at once, as every trial is: a worker checking for stale
        # trials otherwise fails a RUNNING trial that names no process
        user_attrs={WORKER_ATTR: worker_id(), "continued_from": source.number,
                    "fidelity": fidelity},
    )
    trial_id = storage.create_new_trial(study._study_id, template_trial=template)
    if _heartbeat_on(storage):
        storage.record_heartbeat(trial_id)
    number = storage.get_trial_number_from_id(trial_id)
    # a FAIL claim (interrupted, died) is done again: only live or finished claims count
    claims = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE))
              if t.user_attrs.get("continued_from") == source.number]
    if min(claims, default=number) != number:
        storage.set_trial_user_attr(trial_id, "reason", CLAIM_LOST_REASON)
        storage.set_trial_state_values(trial_id, TrialState.PRUNED)
        return None
    return optuna.Trial(study, trial_id)


def rung_running(study: optuna.Study, fidelity: int) -> list[FrozenTrial]:
    """RUNNING trials that will belong to the rung at ``fidelity`` (searched trials for 0)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        source = t.user_attrs.get("continued_from")
        level = 0 if source is None else int(t.user_attrs.get("fidelity", 1))
        if level == fidelity:
            out.append(t)
    return out


def wait_for_rung(study: optuna.Study, storage_url: str, fidelity: int,
                  report: Callable[[str], None] | None = None) -> None:
    """Return once no trial of the rung at ``fidelity`` runs anywhere: live workers'
    trials finish; dead workers' trials are failed once their lease expires
    (:func:`~rankopt.search.storage.fail_stale_trials`). Ctrl-C interrupts the wait."""
    from rankopt.search.storage import (
        _heartbeat_on,
        fail_stale_trials,
        is_local_sqlite,
        same_process_space,
    )

    said = 0.0
    while True:
        running = rung_running(study, fidelity)
        if not running:
            return
        fail_stale_trials(study, study._storage, local=is_local_sqlite(storage_url))
        running = rung_running(study, fidelity)
        if not running:
            return
        if not _heartbeat_on(study._storage):  # no leases: never wait for the unseeable
            blind = sorted({str(t.user_attrs.get("worker", "?")) for t in running
                            if not same_process_space(t.user_attrs.get("worker"))})
            if blind:
                from rankopt.search.owed import TrialsOwed

                raise TrialsOwed(
                    f"{len(running)} trial(s) at fidelity {fidelity} still owed to worker "
                    f"{', '.join(blind)} (no lease on this storage, and that process cannot "
                    "be seen from here); rerun to finish once it has ended")
        if time.monotonic() - said > 30:
            said = time.monotonic()
            workers = sorted({str(t.user_attrs.get("worker", "?")) for t in running})
            text = (f"waiting for {len(running)} trial(s) of other workers ({', '.join(workers)}) "
                    f"to finish before promoting the models at fidelity {fidelity}")
            log.info(text)
            if report is not None:
                report(text)
        time.sleep(POLL_S)
