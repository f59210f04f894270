"""Where continuations (multi_fidelity) run: in this process on the local backend, and as
Ray tasks on the ray backend, with the study's ``resources`` and ``max_concurrent`` like
searched trials, so the driver needs no GPU and continuations run in parallel.

On Ray the source's model travels to the task through the object store (it may be on no
disk of the task's node), and the continued model comes back the same way to
``RUN_DIR/trials/<n>/`` on the driver. While continuations wait or run, the driver beats
their heartbeats (shared RDBs), as it does for searched trials.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from rankopt.search.objective import TrialEnv, clean_trial_dir, write_json

__all__ = ["run_claimed"]

Claimed = tuple[optuna.Trial, FrozenTrial]
# (env, number, source, fidelity) -> metrics: fidelity.continue_trial and its contained form
Continue = Callable[[TrialEnv, int, FrozenTrial, int], dict[str, Any]]


def run_claimed(env: TrialEnv, claimed: list[Claimed], fidelity: int, *, here: Continue, remote: Continue
                ) -> Iterator[tuple[optuna.Trial, FrozenTrial, dict[str, Any]]]:
    """Run the claimed continuations at ``fidelity``; yields ``(trial, source, metrics)``
    as each finishes. ``here`` runs one in this process (local backend), ``remote`` in a
    Ray task (the caller passes them: this module sits below fidelity's)."""
    if not claimed:
        return
    storage = claimed[0][0].study._storage
    with _beating(storage, {t._trial_id for t, _ in claimed}) as pending:
        if env.config.backend == "ray" and _ray_up():
            runs = _on_ray(env, claimed, fidelity, remote)
        else:
            runs = _here(env, claimed, fidelity, here)
        for trial, source, metrics in runs:
            pending.discard(trial._trial_id)
            yield trial, source, metrics


def _ray_up() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return bool(ray.is_initialized())


def _here(env: TrialEnv, claimed: list[Claimed], fidelity: int, here: Continue
          ) -> Iterator[tuple[optuna.Trial, FrozenTrial, dict[str, Any]]]:
    for trial, source in claimed:
        yield trial, source, here(env, trial.number, source, fidelity)


def _files(folder: Path) -> dict[str, bytes]:
    from rankopt.search.artifact_store import TRIAL_FILES

    return {n: (folder / n).read_bytes() for n in TRIAL_FILES if (folder / n).is_file()}


def _write(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda n: n == "metrics.json"):  # metrics last
        tmp = folder / f".{name}.home"
        tmp.write_bytes(files[name])
        tmp.replace(folder / name)


def _continue_on_node(env: TrialEnv, number: int, source: FrozenTrial, fidelity: int,
                      source_files: dict[str, bytes], driver_node: str, continue_trial: Continue
                      ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A Ray task: the continuation, with the source model from the driver, and the new
    trial's folder back when this is another node."""
    import ray

    src = env.trial_dir(source.number)
    if source_files and not (src / "model.pt").is_file():
        _write(src, source_files)
    metrics = continue_trial(env, number, source, fidelity)
    here = str(ray.get_runtime_context().get_node_id())
    back = _files(env.trial_dir(number)) if metrics.get("state") == "COMPLETE" and here != driver_node else {}
    if back:
        metrics["transfer_bytes"] = float(sum(len(b) for b in back.values()))
    return metrics, back


def _on_ray(env: TrialEnv, claimed: list[Claimed], fidelity: int, remote: Continue
            ) -> Iterator[tuple[optuna.Trial, FrozenTrial, dict[str, Any]]]:
    import ray

    from rankopt.search.ray_searcher import worker_failure

    res = env.config.resources
    task = ray.remote(_continue_on_node).options(
        num_cpus=res.cpus, num_gpus=res.gpus, max_retries=0)
    driver_node = str(ray.get_runtime_context().get_node_id())
    env_ref = ray.put(env)
    queue = list(claimed)
    inflight: dict[Any, Claimed] = {}
    try:
        while queue or inflight:
            while queue and len(inflight) < max(1, env.config.max_concurrent):
                trial, source = queue.pop(0)
                files = _files(env.trial_dir(source.number))
                ref = task.remote(env_ref, trial.number, source, fidelity, files, driver_node, remote)
                inflight[ref] = (trial, source)
            done, _ = ray.wait(list(inflight), num_returns=1)
            trial, source = inflight.pop(done[0])
            folder = env.trial_dir(trial.number)
            try:
                metrics, back = ray.get(done[0])
                if back:
                    _write(folder, back)
            except Exception as exc:  # noqa: BLE001 - the task or its node died
                metrics = {"trial": trial.number, "state": "FAIL", "fidelity": fidelity,
                           "continued_from": source.number, "reason": worker_failure(exc)}
                clean_trial_dir(folder)
                write_json(folder / "metrics.json", metrics)
            yield trial, source, metrics
    finally:
        for ref in inflight:  # Ctrl-C or an error: nothing keeps running for this driver
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)


@contextlib.contextmanager
def _beating(storage: Any, trial_ids: set[int]) -> Iterator[set[int]]:
    """Beat the heartbeats of ``trial_ids`` (the set may shrink) until the block ends."""
    from rankopt.search.storage import HEARTBEAT_INTERVAL, _heartbeat_on

    pending = set(trial_ids)
    if not _heartbeat_on(storage):
        yield pending
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(HEARTBEAT_INTERVAL):
            for trial_id in list(pending):
                with contextlib.suppress(Exception):  # finished meanwhile
                    storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=loop, name="rankopt-continuation-heartbeat", daemon=True)
    thread.start()
    try:
        yield pending
    finally:
        stop.set()
        thread.join(timeout=5)
