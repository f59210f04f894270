"""The driver's side of a Ray study: the Optuna searcher that keeps the shared count, the
leases (heartbeats) and the trial folders, and the reasons of trials whose worker died.

Split from :mod:`rankopt.search.ray_backend`, which builds the Tune run around it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from rankopt.search.objective import TrialEnv, set_constraints, user_attrs

__all__ = ["RankoptOptunaSearch", "RecordErrors", "worker_failure", "METRICS_KEY", "TrialDone"]

METRICS_KEY = "rankopt_metrics"
STALE_CHECK_S = 5.0  # how often a waiting driver looks for trials of dead processes
log = logging.getLogger("rankopt.ray")

TrialDone = Callable[[int, Mapping[str, Any], Mapping[str, Any]], None]


class RankoptOptunaSearch(OptunaSearch):  # type: ignore[misc]
    """OptunaSearch that keeps the study's count, leases and artifacts from the driver.

    * ``suggest`` starts a trial only while fewer than ``target`` trials are COMPLETE or
      RUNNING in the shared storage (any driver, any backend), first failing trials whose
      process died; a trial that raced another driver past the count is withdrawn
      (:func:`~rankopt.search.storage.is_surplus`). Failed trials are replaced, up to
      ``budget`` trials started by this run.
    * The driver beats Optuna's heartbeat for the trials its workers run (shared RDBs), so
      another process fails them when this driver dies.
    * ``on_trial_complete`` brings the trial's folder to ``RUN_DIR/trials/<n>/`` (from the
      artifact store when the trial ran on another node), stores the metrics as user attrs
      before telling Optuna, and tells a trial that failed inside rankopt, or whose worker
      died (``worker died: ...``), as FAIL with its reason.
    """

    # live objects of this process: left out of the searcher state Tune pickles
    _LIVE = ("on_done", "errors", "_beat_stop", "_beat_thread", "_lock")
    # rebuilt after unpickling (from the study config and the storage), never pickled:
    # Optuna 5's samplers hold a threading lock, and the study and its trials hold the sampler
    _REBUILT = ("_sampler", "_ot_study", "_ot_trials")

    def __init__(
        self,
        *args: Any,
        env: TrialEnv,
        sampler_config: Any = None,
        target: int | None = None,
        budget: int | None = None,
        on_done: TrialDone | None = None,
        errors: dict[str, BaseException] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        from rankopt.search.refining import refinement_state

        # the refining wrapper's plan (plain data) travels with the pickled searcher
        self.refinement = refinement_state(kwargs["sampler"]) if kwargs.get("sampler") is not None else None
        self.study_config = env.config
        # the config (with its session's seed) the sampler is rebuilt from after unpickling
        self.sampler_config = sampler_config if sampler_config is not None else env.config
        self.run_dir = env.run_dir
        self.store = env.store
        self.target = target
        self.budget = budget
        self.on_done = on_done
        self.errors = errors if errors is not None else {}
        self.started = 0
        self._last_stale_check = 0.0
        self._running: dict[str, int] = {}  # Tune trial id -> Optuna trial id
        self._lock = threading.Lock()
        self._beat_stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items()
                 if k not in self._LIVE and k not in self._REBUILT}
        # the Tune trial id -> Optuna trial id of the trials asked: enough to rebuild them
        trials = self.__dict__.get("_ot_trials")
        state["_ot_trial_ids"] = (state.get("_ot_trial_ids") or {}) if trials is None else {
            tid: t._trial_id for tid, t in trials.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.on_done, self.errors, self._beat_thread = None, {}, None
        self._lock, self._beat_stop = threading.Lock(), threading.Event()
        # the study and its trials are rebuilt on first use (see __getattr__): unpickling
        # needs no storage connection
        from rankopt.search.refining import with_refinement
        from rankopt.search.sampler import make_sampler

        self._sampler = with_refinement(make_sampler(self.sampler_config), self.__dict__.get("refinement"))

    def __getattr__(self, name: str) -> Any:
        # only reached for attributes missing from __dict__: the study of an unpickled copy
        if name in ("_ot_study", "_ot_trials") and "_ot_trial_ids" in self.__dict__:
            self._rebuild_study()
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _rebuild_study(self) -> None:
        import optuna

        ids = self.__dict__.pop("_ot_trial_ids")
        study = optuna.load_study(
            study_name=self._study_name, storage=self._storage, sampler=self._sampler)
        self._ot_study = study
        self._ot_trials = {tid: optuna.Trial(study, trial_id) for tid, trial_id in ids.items()}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as out:
            pickle.dump(self.__getstate__(), out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as src:
            state = pickle.load(src)
        live = {k: self.__dict__[k] for k in self._LIVE if k in self.__dict__}
        for name in self._REBUILT:
            self.__dict__.pop(name, None)
        self.__setstate__(state)
        self.__dict__.update(live)

    # -- leases ---------------------------------------------------------------------------
    def _heartbeats(self) -> bool:
        from rankopt.search.storage import _heartbeat_on

        return _heartbeat_on(self._ot_study._storage)

    def _beat(self, trial_ids: list[int]) -> None:
        storage = self._ot_study._storage
        for trial_id in trial_ids:
            with contextlib.suppress(Exception):  # a trial finished meanwhile
                storage.record_heartbeat(trial_id)

    def start_heartbeats(self) -> None:
        if not self._heartbeats() or self._beat_thread is not None:
            return
        from rankopt.search.storage import HEARTBEAT_INTERVAL

        def loop() -> None:
            while not self._beat_stop.wait(HEARTBEAT_INTERVAL):
                with self._lock:
                    ids = list(self._running.values())
                self._beat(ids)

        self._beat_thread = threading.Thread(target=loop, name="rankopt-heartbeat", daemon=True)
        self._beat_thread.start()

    def stop_heartbeats(self) -> None:
        self._beat_stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)

    # -- the count ------------------------------------------------------------------------
    def _fail_stale(self) -> None:
        from rankopt.search.objective import clean_trial_dir
        from rankopt.search.storage import STALE_REASON, fail_stale_trials, is_local_sqlite

        if time.monotonic() - self._last_stale_check < STALE_CHECK_S:
            return
        self._last_stale_check = time.monotonic()
        storage = self._ot_study._storage
        url = str(getattr(getattr(storage, "_backend", storage), "url", ""))
        for number in fail_stale_trials(self._ot_study, storage, local=is_local_sqlite(url)):
            clean_trial_dir(self.run_dir / "trials" / str(number), reason=STALE_REASON)

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        from rankopt.search.storage import WITHDRAWN_REASON, is_surplus

        if self.budget is not None and self.started >= self.budget:
            return Searcher.FINISHED
        if self.target is not None:
            self._fail_stale()
            states = [t.state for t in self._ot_study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))]
            if states.count(TrialState.COMPLETE) >= self.target:
                return Searcher.FINISHED
            if len(states) >= self.target:
                from rankopt.search.storage import worth_waiting

                with self._lock:
                    own = {t.number for tid, t in self._ot_trials.items() if tid in self._running}
                if worth_waiting(self._ot_study, self._ot_study._storage, own):
                    return None  # asked again soon: a running trial may yet fail
                return Searcher.FINISHED  # live workers elsewhere finish the count
        config = super().suggest(trial_id)
        if not isinstance(config, dict):
            return config
        ot_trial = self._ot_trials[trial_id]
        if self.target is not None and is_surplus(self._ot_study, ot_trial.number, self.target):
            ot_trial.set_user_attr("reason", WITHDRAWN_REASON)
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            del self._ot_trials[trial_id]
            return None
        self.started += 1
        with self._lock:
            self._running[trial_id] = ot_trial._trial_id
        if self._heartbeats():
            self._beat([ot_trial._trial_id])
        return config

    # -- results --------------------------------------------------------------------------
    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        with self._lock:
            self._running.pop(trial_id, None)
        # `_ot_trials` (Tune trial id -> Optuna trial) is where OptunaSearch keeps them
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            super().on_trial_complete(trial_id, result=result, error=error)
            return
        raw = (result or {}).get(METRICS_KEY)
        number = ot_trial.number
        stored = self._ot_study._storage.get_trial(ot_trial._trial_id)
        if stored.state.is_finished():
            # another worker judged this driver dead and failed the trial meanwhile: the
            # storage keeps that verdict (the count replaces the trial)
            log.warning("trial %d was failed meanwhile by another worker (%s); not counted",
                        number, stored.user_attrs.get("reason", stored.state.name))
            self._ot_trials.pop(trial_id, None)
            return
        if raw:
            metrics = json.loads(raw)
        else:
            metrics = {"trial": number, "state": "FAIL",
                       "reason": worker_failure(self.errors.pop(trial_id, None))}
        metrics = self._materialize(number, metrics)
        for key, value in user_attrs(metrics).items():
            ot_trial.set_user_attr(key, value)
        set_constraints(ot_trial, self.study_config, metrics)
        if metrics.get("state") != "COMPLETE":
            result, error = None, True
        values = dict(ot_trial.params)
        super().on_trial_complete(trial_id, result=result, error=error)
        if self.on_done is not None:
            self.on_done(number, values, metrics)

    def _materialize(self, number: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """The trial's folder under ``RUN_DIR/trials/<n>/`` as the worker left it (a
        failed trial's folder holds only its metrics)."""
        from rankopt.search.objective import clean_trial_dir, write_json

        folder = self.run_dir / "trials" / str(number)
        if metrics.get("state") == "COMPLETE" and metrics.get("repeat_of") is not None:
            # a repeat has no model of its own by design (its model is repeat_of's): only
            # its metrics come home, and they came with the result
            if not _same_metrics(folder, metrics):
                folder.mkdir(parents=True, exist_ok=True)
                write_json(folder / "metrics.json", {
                    k: v for k, v in metrics.items() if k != "traceback"} | {"trial": number})
            return metrics
        if metrics.get("state") == "COMPLETE":
            if not _same_run(folder, metrics) and self.store is not None:
                try:
                    fetch = time.perf_counter()
                    self.store.fetch_trial(number, folder)
                    # upload from the worker plus fetch here: the trip of the trial's files
                    metrics["artifact_seconds"] = (
                        float(metrics.get("artifact_seconds", 0.0)) + time.perf_counter() - fetch)
                except Exception as exc:  # noqa: BLE001 - reported as the trial's failure
                    metrics = {**metrics, "state": "FAIL", "reason": str(exc)}
            if metrics.get("state") == "COMPLETE" and not _same_run(folder, metrics):
                where = "the artifact store" if self.store is not None else "this machine"
                metrics = {**metrics, "state": "FAIL", "reason": (
                    f"artifacts: trial {number} ran on node {metrics.get('node', '?')} and its "
                    f"model did not reach {where}; set artifacts: to an fsspec URL (or shared "
                    "folder) that every node reaches")}
        if metrics.get("state") != "COMPLETE":
            from rankopt.core.errors import UnsafePathError

            clean_trial_dir(folder)
            try:
                write_json(folder / "metrics.json", {
                    k: v for k, v in metrics.items() if k != "traceback"} | {"trial": number})
            except UnsafePathError as exc:  # a planted link: nothing is written through it
                log.warning("trial %d: %s", number, exc)
        return metrics


def _same_metrics(folder: Path, metrics: Mapping[str, Any]) -> bool:
    """True when ``folder`` holds this trial's metrics (not an older copy)."""
    try:
        local = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(local.get("seconds") == metrics.get("seconds"))


def _same_run(folder: Path, metrics: Mapping[str, Any]) -> bool:
    """True when ``folder`` holds this trial's model and its metrics (not an older copy)."""
    return (folder / "model.pt").is_file() and _same_metrics(folder, metrics)


def worker_failure(exc: BaseException | None) -> str:
    """``worker died on node N (pid P): <Ray's cause>`` for a Ray worker (or its node) that
    ended without a result: the node from Tune's placement of the trial (or the ``ip:``
    of Ray's error), the cause from Ray's error text."""
    if exc is None:
        return "worker died: the Ray worker ended without reporting a result"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    fields = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key in ("ip", "pid", "class_name", "actor_id", "name", "namespace"):
            fields[key] = value.strip()
    # Ray's cause: the first line that is neither its generic header nor a field
    causes = [line for line in lines if line.partition(":")[0] not in fields
              and not line.startswith("The actor died unexpectedly before finishing")]
    cause = causes[0] if causes else (lines[0] if lines else type(exc).__name__)
    where = getattr(exc, "rankopt_location", None) or fields.get("ip")
    pid = fields.get("pid")
    node = f" on node {where}" + (f" (pid {pid})" if pid else "") if where else ""
    return f"worker died{node}: {type(exc).__name__}: {cause}"[:500]


def _trial_error(trial: Any) -> BaseException | None:
    """The error Tune just recorded for ``trial``: from the trial's local error files
    (Tune writes them there at once; the copies under the storage path come later, with
    the next sync, so ``get_pickled_error`` alone often finds nothing yet)."""
    from ray import cloudpickle

    for read in (
        lambda: cloudpickle.loads(Path(trial.pickled_error_file).read_bytes()),
        lambda: RuntimeError(Path(trial.error_file).read_text().split("\n", 1)[1].strip()),
        trial.get_pickled_error,
        trial.get_error,
    ):
        with contextlib.suppress(Exception):
            exc = read()
            if isinstance(exc, BaseException):
                return exc
    return None


class RecordErrors(FIFOScheduler):  # type: ignore[misc]
    """Tune tells the scheduler of a trial error before the searcher: keep the exception
    for the searcher's reason, and Ray's traceback for the log file."""

    def __init__(self, errors: dict[str, BaseException]) -> None:
        super().__init__()
        self.errors = errors

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "errors": {}}

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        exc = _trial_error(trial)
        if exc is not None:
            with contextlib.suppress(Exception):  # where Tune placed it (no remote call)
                place = trial.temporary_state.location
                if place.hostname:
                    exc.rankopt_location = place.hostname  # type: ignore[attr-defined]
            self.errors[trial.trial_id] = exc
            log.error("trial %s failed in Ray:\n%s", trial.trial_id,
                      "".join(traceback.format_exception(exc)))
        super().on_trial_error(tune_controller, trial)
