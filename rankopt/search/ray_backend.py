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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from ray.tune.stopper import Stopper

from rankopt.config.schema import StudyConfig
from rankopt.core.errors import ConfigError
from rankopt.search.local import quiet_optuna
from rankopt.search.objective import TrialEnv, run_trial
from rankopt.search.ray_searcher import METRICS_KEY, RankoptOptunaSearch, RecordErrors, TrialDone
from rankopt.search.space import SearchSpace

__all__ = ["connect", "run_ray", "TRIAL_NUMBER_KEY", "METRICS_KEY"]

TRIAL_NUMBER_KEY = "_rankopt_trial_number"
METRIC_NAMES = {"accuracy": "accuracy", "params": "params", "flops": "flops", "latency": "latency_ratio"}

RAY_LOG = "ray.log"


def connect(config: StudyConfig) -> bool:
    """Start or join Ray and check it can give the resources a trial asks for.

    Returns True when this call started Ray (the caller shuts it down). Raises
    :class:`ConfigError` at once when nothing answers at the address (within
    :data:`~rankopt.search.ray_checks.PROBE_TIMEOUT_S`), or when a trial asks for more
    GPUs or CPUs than the largest node has (a trial would otherwise wait forever).
    """
    import ray

    started = False
    if not ray.is_initialized():
        address = config.address or os.environ.get("RAY_ADDRESS") or None
        from rankopt.search.ray_checks import probe_address

        probe_address(address)  # ray.init retries an address where nothing answers for ever
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
    from rankopt.search.ray_checks import largest_node_problem

    have_gpus = ray.cluster_resources().get("GPU", 0.0)
    want = config.resources
    # a trial runs on one node: the largest node counts, not the cluster's total
    problem = largest_node_problem(ray.nodes(), want.cpus, want.gpus)
    if problem is None and _names_cuda(config.device) and have_gpus == 0:
        problem = (
            f"device: {config.device!r} with backend ray needs GPUs in the Ray cluster, which "
            f"has none; use device: auto or cpu, or add GPU nodes"
        )
    elif problem is None and _names_cuda(config.device) and want.gpus == 0:
        problem = (
            f"resources.gpus: 0 with device {config.device!r}: Ray hides the GPUs from a "
            "trial that asks for none; set resources.gpus: 1 (one trial per GPU)"
        )
    if problem is not None:
        if started:
            ray.shutdown()
        raise ConfigError(problem)
    return started


def _names_cuda(device: str) -> bool:
    return device.strip().lower().startswith("cuda")


def _trainable(config: dict[str, Any], env: TrialEnv, inbox: Any = None,
               driver_node: str = "") -> None:
    """One Ray trial: run it and report its metrics (Tune calls this in a worker). With an
    ``inbox`` (no artifact store), a trial on another node sends its folder home."""
    from ray import tune

    values = dict(config)
    number = int(values.pop(TRIAL_NUMBER_KEY))
    metrics = run_trial(env, number, values)
    if inbox is not None and metrics["state"] == "COMPLETE" and metrics.get("repeat_of") is None:
        from rankopt.search.ray_inbox import send_home

        try:
            metrics.update(send_home(inbox, driver_node, env.trial_dir(number), number))
        except Exception as exc:  # noqa: BLE001 - the trial's model is lost to the driver
            metrics.update(state="FAIL", reason=(
                f"trial {number}'s model could not be sent to the driver's node "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"))
    report: dict[str, Any] = {METRICS_KEY: json.dumps(metrics, default=str)}
    complete = metrics["state"] == "COMPLETE"
    for objective in env.config.objectives:
        key = METRIC_NAMES[objective]
        # Tune rejects a result without the searcher's metrics; a failed trial reports
        # NaN, and RankoptOptunaSearch tells Optuna it failed
        report[key] = float(metrics[key]) if complete else float("nan")
    tune.report(report)


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


# Tune's per-trial bookkeeping that rankopt does not use (benchmarks/bench_ray_overhead.py):
# its result loggers (json/csv/TensorBoard files per trial: rankopt writes metrics.json),
# and frequent experiment-state snapshots (the Optuna storage is what a rerun resumes from)
LEAN_TUNE_ENV = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "TUNE_GLOBAL_CHECKPOINT_S": "300"}


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's legacy console output honours ``verbose=0``; the new one prints regardless.
    Also :data:`LEAN_TUNE_ENV`, unless the user's environment sets those variables."""
    changes = {"RAY_AIR_NEW_OUTPUT": "0",
               **{k: v for k, v in LEAN_TUNE_ENV.items() if k not in os.environ}}
    before = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    from rankopt.search.sampler import sampler_config

    searcher = RankoptOptunaSearch(
        env=env,
        sampler_config=sampler_config(study.sampler, config),
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
    inbox, driver_node = None, ""
    if env.store is None:  # models come home through Ray itself (see ray_inbox)
        from rankopt.search.ray_inbox import start_inbox

        inbox, driver_node = start_inbox(env.run_dir)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, env=env, inbox=inbox, driver_node=driver_node), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=RecordErrors(errors),
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
            # trials report once and keep nothing for Tune to checkpoint or sync
            checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=0,
                                                    checkpoint_at_end=False),
        ),
    )
    searcher.start_heartbeats()
    try:
        tuner.fit()
    finally:
        searcher.stop_heartbeats()
        if inbox is not None:
            import ray

            ray.kill(inbox)
