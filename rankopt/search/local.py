"""The embedded backend: Optuna in this process, trials one after another (or in threads)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from rankopt.core.safe_paths import remove_tree
from rankopt.search.continuations import finished_elsewhere
from rankopt.search.objective import (
    TrialEnv,
    clean_trial_dir,
    interrupts,
    objective_values,
    set_constraints,
    user_attrs,
)
from rankopt.search.watchdog import run_trial_contained

__all__ = ["run_local", "TrialFailed", "quiet_optuna", "torch_threads"]

log = logging.getLogger("rankopt.study")

WAIT_S = 2.0  # how often a worker with nothing to start looks again (a trial may fail)

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
    target: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Run up to ``n_trials`` new trials (and/or until ``timeout`` seconds) into ``study``.

    ``target``: the number of completed trials the study wants in all. A trial starts
    only while fewer than ``target`` trials are COMPLETE or RUNNING (by any process on
    this machine, under :class:`~rankopt.search.storage.TrialClaim`), so concurrent
    workers on one study run exactly ``target`` trials between them; a trial another
    machine's worker started past the count is withdrawn (PRUNED). When the count is
    full but not all COMPLETE, the worker fails trials of dead processes (PID and start
    time here, heartbeats on a shared RDB) and waits: a surviving worker finishes the
    count, or leaves it to live workers elsewhere. ``should_stop``
    is asked before each new trial (e.g. ``max_failures`` reached).
    """
    from rankopt.search.rundir import INTERRUPTED_REASON
    from rankopt.search.storage import (
        STALE_REASON,
        WITHDRAWN_REASON,
        WORKER_ATTR,
        TrialClaim,
        fail_stale_trials,
        is_local_sqlite,
        is_surplus,
        worker_id,
        worth_waiting,
    )

    finished: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    claim = TrialClaim(env.run_dir)
    me = worker_id()
    counter_lock = threading.Lock()
    started = [0]
    mine: set[int] = set()  # trials this process's threads are running
    full = threading.Event()
    deadline = None if timeout is None else time.monotonic() + timeout

    def objective(trial: optuna.Trial) -> list[float]:
        # the trial is RUNNING now; once it names its process other workers may go on
        trial.set_user_attr(WORKER_ATTR, me)
        with counter_lock:
            mine.add(trial.number)
        claim.release()
        if target is not None and is_surplus(study, trial.number, target):
            trial.set_user_attr("reason", WITHDRAWN_REASON)
            raise optuna.TrialPruned(WITHDRAWN_REASON)
        try:
            values = env.space.suggest(trial)
            try:
                # the trial is named: Ctrl-C and SIGTERM may cut its work (not ask or tell)
                with interrupts(deferred=False):
                    # in a child process under trial_timeout / isolate: process (watchdog)
                    metrics = run_trial_contained(env, trial.number, values)
            finally:
                with counter_lock:
                    mine.discard(trial.number)
            for key, value in user_attrs(metrics).items():
                trial.set_user_attr(key, value)
            set_constraints(trial, env.config, metrics)
        except KeyboardInterrupt:
            # Ctrl-C: Optuna stores the trial FAIL; say why and drop its partial folder
            # (even a finished metrics.json: storage is the truth, the trial did not complete)
            with contextlib.suppress(Exception):
                trial.set_user_attr("reason", INTERRUPTED_REASON)
            with contextlib.suppress(OSError):  # UnsafePathError too: a link is left alone
                remove_tree(env.run_dir, env.trial_dir(trial.number))
            raise
        finished[trial.number] = (values, metrics)
        if metrics["state"] != "COMPLETE":
            log.warning("trial %d failed: %s", trial.number, metrics.get("reason"))
            raise TrialFailed(metrics.get("reason", "failed"))
        return objective_values(metrics, env.config.objectives)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial_done is not None and trial.number in finished:
            values, metrics = finished.pop(trial.number)
            on_trial_done(trial.number, values, metrics)

    def wanted() -> str:
        if target is None:
            return True
        # a worker that died mid-trial leaves it RUNNING: fail it here (and so run its
        # replacement) rather than stop one trial short
        storage = study._storage
        url = str(getattr(getattr(storage, "_backend", storage), "url", ""))
        for number in fail_stale_trials(study, storage, local=is_local_sqlite(url)):
            log.warning("trial %d failed: %s", number, STALE_REASON)
            clean_trial_dir(env.trial_dir(number), reason=STALE_REASON)
        states = [t.state for t in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))]
        if len(states) < target:
            return "run"
        # full: done, or wait while a running trial may yet fail (see worth_waiting)
        if states.count(TrialState.COMPLETE) >= target:
            return "done"
        with counter_lock:
            own = set(mine)
        return "wait" if worth_waiting(study, storage, own) else "done"

    def worker() -> None:
        while not full.is_set():
            if should_stop is not None and should_stop():
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            with counter_lock:
                if n_trials is not None and started[0] >= n_trials:
                    return
                started[0] += 1
            claim.acquire()
            try:
                want = wanted()
                if want == "done":
                    full.set()
                    return
                if want == "wait":
                    with counter_lock:
                        started[0] -= 1
                    claim.release()
                    time.sleep(WAIT_S)
                    continue
                try:
                    with interrupts(deferred=True):  # see objective: only the trial's work is cut
                        study.optimize(
                            objective, n_trials=1, catch=(TrialFailed,), callbacks=[callback],
                            gc_after_trial=False,
                        )
                except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as exc:
                    if not finished_elsewhere(exc):
                        raise
                    # another worker judged this one dead and failed its trial (see
                    # storage.fail_stale_trials): the storage keeps that verdict, the
                    # count replaces the trial
                    log.warning("a trial that ran here was failed meanwhile by another "
                                "worker (%s); it is not counted, and is replaced", exc)
                    with counter_lock:
                        started[0] -= 1
            finally:
                claim.release()  # when the trial never started (a no-op otherwise)

    with quiet_optuna():
        if n_jobs <= 1:
            worker()
        else:
            with concurrent.futures.ThreadPoolExecutor(n_jobs) as pool:
                for future in [pool.submit(worker) for _ in range(n_jobs)]:
                    future.result()


@contextlib.contextmanager
def torch_threads(cpus: float) -> Iterator[None]:
    """Run with torch's intra-op threads set to a trial's CPUs (restored afterwards).

    Small models train several times faster on one thread than on an oversubscribed
    pool; Ray workers get the same from Ray's OMP_NUM_THREADS.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, math.ceil(cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
