"""The Ray Tune backend: the same trials, run by Ray workers, proposed by ``OptunaSearch``.

``OptunaSearch`` (``ray.tune.search.optuna``) drives the study's own Optuna sampler
and storage from the driver with the same define-by-run space as the local backend,
so both backends fill the same storage and the same ``trials/<number>/`` folders.
Workers only run :func:`~rankopt.search.objective.run_trial` and report the metrics
back; the driver writes them into the storage (user attrs, then values), so workers
never write to the storage (SQLite is not safe across machines).

Resources per trial come from ``resources`` (``tune.with_resources``: one GPU per
trial when ``gpus: 1``), the concurrency limit from ``max_concurrent``
(``ConcurrencyLimiter``), and the cluster from ``address`` / ``RAY_ADDRESS`` (a local
Ray instance otherwise; an already initialized one is reused).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from rankopt.config import StudyConfig
from rankopt.errors import ConfigError
from rankopt.search.local import quiet_optuna
from rankopt.search.objective import TrialEnv, run_trial, set_constraints, user_attrs
from rankopt.search.space import SearchSpace

__all__ = ["connect", "run_ray", "TRIAL_NUMBER_KEY", "METRICS_KEY"]

TRIAL_NUMBER_KEY = "_rankopt_trial_number"
METRICS_KEY = "rankopt_metrics"
METRIC_NAMES = {"accuracy": "accuracy", "params": "params", "flops": "flops", "latency": "latency_ms"}

RAY_LOG = "ray.log"
STALE_CHECK_S = 5.0  # how often a waiting driver looks for trials of dead processes
log = logging.getLogger("rankopt.ray")

TrialDone = Callable[[int, Mapping[str, Any], Mapping[str, Any]], None]


def connect(config: StudyConfig) -> bool:
    """Start or join Ray and check it can give the resources a trial asks for.

    Returns True when this call started Ray (the caller shuts it down). Raises
    :class:`ConfigError` at once when a trial asks for more GPUs or CPUs than the
    cluster has (a trial would otherwise wait forever).
    """
    import ray

    started = False
    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"address: cannot connect to the Ray cluster at {address!r} ({exc}); start it "
                "with `ray start --head` or fix --address / RAY_ADDRESS"
            ) from None
        started = True
    resources = ray.cluster_resources()
    have_gpus = resources.get("GPU", 0.0)
    have_cpus = resources.get("CPU", 0.0)
    want = config.resources
    problem = None
    if want.gpus > have_gpus:
        problem = (
            f"resources.gpus: {want.gpus:g} GPU(s) per trial requested, but the Ray cluster "
            f"has {have_gpus:g}; set resources.gpus: 0 or run on a GPU cluster (--address)"
        )
    elif _names_cuda(config.device) and have_gpus == 0:
        problem = (
            f"device: {config.device!r} with backend ray needs GPUs in the Ray cluster, which "
            f"has none ({have_cpus:g} CPUs); use device: auto or cpu, or add GPU nodes"
        )
    elif _names_cuda(config.device) and want.gpus == 0:
        problem = (
            f"resources.gpus: 0 with device {config.device!r}: Ray hides the GPUs from a "
            "trial that asks for none; set resources.gpus: 1 (one trial per GPU)"
        )
    elif want.cpus > have_cpus:
        problem = (
            f"resources.cpus: {want.cpus:g} CPU(s) per trial requested, but the Ray cluster "
            f"has {have_cpus:g}; lower resources.cpus"
        )
    if problem is not None:
        if started:
            ray.shutdown()
        raise ConfigError(problem)
    return started


def _names_cuda(device: str) -> bool:
    return device.strip().lower().startswith("cuda")


def _trainable(config: dict[str, Any], env: TrialEnv) -> None:
    """One Ray trial: run it and report its metrics (Tune calls this in a worker)."""
    from ray import tune

    values = dict(config)
    number = int(values.pop(TRIAL_NUMBER_KEY))
    metrics = run_trial(env, number, values)
    report: dict[str, Any] = {METRICS_KEY: json.dumps(metrics, default=str)}
    complete = metrics["state"] == "COMPLETE"
    for objective in env.config.objectives:
        key = METRIC_NAMES[objective]
        # Tune rejects a result without the searcher's metrics; a failed trial reports
        # NaN, and RankoptOptunaSearch tells Optuna it failed
        report[key] = float(metrics[key]) if complete else float("nan")
    tune.report(report)


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

    def __init__(
        self,
        *args: Any,
        env: TrialEnv,
        target: int | None = None,
        budget: int | None = None,
        on_done: TrialDone | None = None,
        errors: dict[str, BaseException] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.study_config = env.config
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
        return {k: v for k, v in self.__dict__.items() if k not in self._LIVE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.on_done, self.errors, self._beat_thread = None, {}, None
        self._lock, self._beat_stop = threading.Lock(), threading.Event()

    def save(self, checkpoint_path: str) -> None:
        hidden = {k: self.__dict__.pop(k) for k in self._LIVE if k in self.__dict__}
        try:
            super().save(checkpoint_path)
        finally:
            self.__dict__.update(hidden)

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
                return None  # asked again soon: a running trial may yet fail
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
            clean_trial_dir(folder)
            write_json(folder / "metrics.json", {
                k: v for k, v in metrics.items() if k != "traceback"} | {"trial": number})
        return metrics


def _same_run(folder: Path, metrics: Mapping[str, Any]) -> bool:
    """True when ``folder`` holds this trial's model and its metrics (not an older copy)."""
    try:
        local = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return (folder / "model.pt").is_file() and local.get("seconds") == metrics.get("seconds")


def worker_failure(exc: BaseException | None) -> str:
    """``worker died: ...`` for a Ray worker (or its node) that ended without a result."""
    if exc is None:
        return "worker died: the Ray worker ended without reporting a result"
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), type(exc).__name__)
    return f"worker died: {type(exc).__name__}: {first.strip()}"[:500]


class _RecordErrors(FIFOScheduler):  # type: ignore[misc]
    """Tune tells the scheduler of a trial error before the searcher: keep the exception
    for the searcher's reason, and Ray's traceback for the log file."""

    def __init__(self, errors: dict[str, BaseException]) -> None:
        super().__init__()
        self.errors = errors

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "errors": {}}

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        exc: BaseException | None = None
        with contextlib.suppress(Exception):
            exc = trial.get_pickled_error() or trial.get_error()
        if exc is not None:
            self.errors[trial.trial_id] = exc
            log.error("trial %s failed in Ray:\n%s", trial.trial_id,
                      "".join(traceback.format_exception(exc)))
        super().on_trial_error(tune_controller, trial)


class DefineByRun:
    """The define-by-run space OptunaSearch calls: the study's space, plus the trial number.

    A module-level class, since OptunaSearch pickles its space into Tune's checkpoints.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: Any) -> dict[str, Any]:
        from rankopt.search.storage import WORKER_ATTR, _heartbeat_on, worker_id

        # the driver owns the trial: if it dies, a rerun finds the trial stale; its first
        # heartbeat at once (shared RDBs), so that other machines can tell when it stops
        storage = trial.study._storage
        if _heartbeat_on(storage):
            storage.record_heartbeat(trial._trial_id)
        trial.set_user_attr(WORKER_ATTR, worker_id())
        self.space.suggest(trial)
        return {TRIAL_NUMBER_KEY: trial.number}


def run_ray(
    env: TrialEnv,
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    *,
    n_trials: int | None,
    on_trial_done: TrialDone | None = None,
    should_stop: Callable[[], bool] | None = None,
    target: int | None = None,
) -> None:
    """Run up to ``n_trials`` new trials (and/or until ``timeout``) through Ray Tune;
    ``target``: the COMPLETE trials the study wants in all (checked in the shared storage
    before each trial); ``should_stop`` (asked by Tune in the driver) ends the run early.
    Ray's own log lines and tracebacks go to ``RUN_DIR/ray.log``."""

    with quiet_optuna(), _quiet_tune(), _ray_log(env.run_dir):
        _fit(env, study, storage, n_trials=n_trials, on_trial_done=on_trial_done,
             should_stop=should_stop, target=target)


@contextlib.contextmanager
def _ray_log(run_dir: Path) -> Iterator[None]:
    """Ray's and Tune's loggers write to ``RUN_DIR/ray.log`` instead of the terminal."""
    handler = logging.FileHandler(Path(run_dir) / RAY_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    saved = []
    for name in ("ray", "rankopt.ray"):
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        handler.close()


class _StopWhen(Stopper):  # type: ignore[misc]
    """Tune stopper that ends the whole run when ``should_stop()`` says so."""

    def __init__(self, should_stop: Callable[[], bool] | None) -> None:
        self.should_stop = should_stop

    def __getstate__(self) -> dict[str, Any]:
        return {"should_stop": None}  # pickled into Tune's experiment state

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return bool(self.should_stop is not None and self.should_stop())


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's legacy console output honours ``verbose=0``; the new one prints regardless."""
    before = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = before


def _fit(
    env: TrialEnv,
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    *,
    n_trials: int | None,
    on_trial_done: TrialDone | None,
    should_stop: Callable[[], bool] | None = None,
    target: int | None = None,
) -> None:
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    config = env.config
    objectives = config.objectives
    errors: dict[str, BaseException] = {}
    # failed trials are replaced: up to max_failures of them (as many as asked otherwise)
    budget = None if n_trials is None else n_trials + (config.max_failures or n_trials)
    searcher = RankoptOptunaSearch(
        env=env,
        target=target,
        budget=budget,
        on_done=on_trial_done,
        errors=errors,
        space=DefineByRun(env.space),
        metric=[METRIC_NAMES[o] for o in objectives],
        mode=["max" if d == "maximize" else "min" for d in config.directions],
        sampler=study.sampler,
        study_name=study.study_name,
        storage=storage,
    )
    search_alg = ConcurrencyLimiter(searcher, max_concurrent=config.max_concurrent)
    resources = {"cpu": config.resources.cpus, "gpu": config.resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(_trainable, env=env), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=_RecordErrors(errors),
            # with a target the searcher ends the run once the count is met (failed
            # trials replaced); without one, n_trials or the timeout does
            num_samples=-1 if target is not None or n_trials is None else n_trials,
            time_budget_s=config.timeout,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=config.name,
            storage_path=str((env.run_dir / "ray").resolve()),
            verbose=0,
            stop=_StopWhen(should_stop),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )
    searcher.start_heartbeats()
    try:
        tuner.fit()
    finally:
        searcher.stop_heartbeats()
