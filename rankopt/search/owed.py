"""A survivor that finishes the job (issue 28, item 8): when the wanted count is short only
because other workers' trials are RUNNING, wait for them (with a countdown to their
lease's end), let the stale ones be failed, and say what is missing; never end short
and silent.

A trial's lease is its last heartbeat plus the storage's grace period (shared RDBs). On
the embedded SQLite file there are no heartbeats: a worker of this machine's PID space is
judged by its PID (a dead one's trials are failed at once); one that cannot be judged
(another PID namespace or machine) leaves its trials owed, and the survivor stops with
one line instead of waiting for ever.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from rankopt.core.errors import RankoptError

__all__ = ["TrialsOwed", "owed_trials", "wait_for_owed", "POLL_S", "SAY_EVERY_S"]

POLL_S = 2.0
SAY_EVERY_S = 10.0


class TrialsOwed(RankoptError):
    """Searched trials the study wants are still RUNNING in workers this process cannot
    wait for (the CLI exits 1 with its one line)."""


def owed_trials(study: optuna.Study, me: str) -> list[FrozenTrial]:
    """RUNNING searched trials of other workers than ``me``."""
    from rankopt.search.storage import WORKER_ATTR

    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("continued_from") is None and t.user_attrs.get(WORKER_ATTR) != me]


def _leases(storage: optuna.storages.BaseStorage, trials: list[FrozenTrial]) -> dict[int, float]:
    """Seconds left on each trial's lease (by number): last heartbeat + grace period - now."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    from rankopt.search.storage import GRACE_PERIOD, sqlalchemy_now

    backend = getattr(storage, "_backend", storage)
    ids = {t._trial_id: t for t in trials}
    if not ids or not hasattr(backend, "scoped_session"):
        return {}
    with _create_scoped_session(backend.scoped_session) as session:
        now = session.execute(sqlalchemy_now()).scalar().replace(tzinfo=None)
        beats = {row.trial_id: row.heartbeat for row in session.query(
            models.TrialHeartbeatModel).filter(models.TrialHeartbeatModel.trial_id.in_(list(ids)))}
    out = {}
    for trial_id, trial in ids.items():
        last = beats.get(trial_id) or trial.datetime_start
        if last is not None:
            out[trial.number] = max(0.0, GRACE_PERIOD - (now - last).total_seconds())
    return out


def _judgeable(worker: object) -> bool:
    from rankopt.search.storage import same_process_space

    return same_process_space(worker)


def wait_for_owed(study: optuna.Study, storage_url: str, me: str,
                  say: Callable[[str], None] | None = None) -> bool:
    """Wait until no other worker's searched trial is RUNNING; returns True when there was
    one to wait for. Raises :class:`TrialsOwed` in one line when they cannot be waited for
    (no lease on this storage and a worker whose process cannot be seen from here)."""
    from rankopt.search.storage import (
        WORKER_ATTR,
        _heartbeat_on,
        fail_stale_trials,
        is_local_sqlite,
    )

    storage = study._storage
    leased = _heartbeat_on(storage)
    waited = False
    said = 0.0
    while True:
        fail_stale_trials(study, storage, local=is_local_sqlite(storage_url))
        owed = owed_trials(study, me)
        if not owed:
            return waited
        by_worker: dict[str, list[FrozenTrial]] = {}
        for t in owed:
            by_worker.setdefault(str(t.user_attrs.get(WORKER_ATTR, "?")), []).append(t)
        if not leased:
            blind = [w for w in by_worker if not _judgeable(w)]
            if blind:
                n = sum(len(by_worker[w]) for w in blind)
                raise TrialsOwed(
                    f"{n} trial(s) still owed to worker {', '.join(blind)} (no lease on this "
                    "storage, and that process cannot be seen from here); rerun to finish "
                    "once it has ended")
        waited = True
        if time.monotonic() - said >= SAY_EVERY_S and say is not None:
            said = time.monotonic()
            leases = _leases(storage, owed) if leased else {}
            parts = []
            for worker, trials in sorted(by_worker.items()):
                left = [leases[t.number] for t in trials if t.number in leases]
                expiry = f"; lease expires in {max(left):.0f} s unless it beats" if left else ""
                parts.append(f"{len(trials)} trial(s) of worker {worker}{expiry}")
            say("waiting for " + ", ".join(parts) + " (Ctrl-C stops; rerun to finish)")
        time.sleep(POLL_S)
