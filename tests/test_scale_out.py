"""Scale out (issue 13): a Ray cluster of two nodes with no shared file system, several
drivers on one PostgreSQL study, dead workers and dead drivers, device checks.

The cluster tests run a real two-node cluster inside private namespaces (see
``ray_cluster_support``); they skip, saying why, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

import rankopt
from rankopt.results.reading import StudyResult
from ray_cluster_support import require_namespaces, run_in_cluster
from reliability_support import postgres_url
from study_support import RAY, digits_study

ray = pytest.importorskip("ray")



def study(name: str, run_dir: Path, **changes: Any) -> dict[str, Any]:
    return digits_study(name, run_dir, **{"trials": 3, **RAY, **changes})


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_two_node_cluster_models_reach_the_driver_and_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    require_namespaces()
    machine = tmp_path / "machineA"  # the second node sees an empty folder here
    store = tmp_path / "store"  # a folder both nodes reach (an NFS mount, a bucket...)
    run_a, run_b = machine / "run", machine / "runb"
    machine.mkdir()
    # a: two trials, run side by side on the second node's 2 CPUs (a third showed nothing
    # more; suite time)
    a = write(tmp_path / "a.yaml", study("two", run_a, artifacts=str(store), trials=2,
                                         reference={"epochs": 1, "lr": 0.05, "on": "cluster"}))
    b = write(tmp_path / "b.yaml", study("killed", run_b, artifacts=str(store), trials=2,
                                         max_concurrent=1,
                                         strategies={"finetune": {"epochs": 6, "lr": 0.02}}))
    picked = tmp_path / "picked"
    script = f"""
cd {tmp_path}
rankopt run {a} -q > a.out 2>&1; echo $? > a.rc
rankopt run {b} -q > b.out 2>&1 &
driver=$!
for i in $(seq 1200); do
  w=$(ps -eo pid=,args= | awk '/ray::ImplicitFunc.train/ && !/awk/ {{print $1; exit}}')
  [ -n "$w" ] && break
  sleep 0.1
done
sleep 1.5
kill -9 $w && echo $w > killed
wait $driver; echo $? > b.rc
"""
    proc = run_in_cluster(script, tmp=tmp_path, hide=machine)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out_a = (tmp_path / "a.out").read_text()
    assert (tmp_path / "a.rc").read_text().strip() == "0", out_a[-3000:]

    # every trial ran on the second node (the head has no CPUs) and its folder is here
    result = StudyResult(run_a)
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    for t in trials:
        folder = run_a / "trials" / str(t.number)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["state"] == "COMPLETE"
        model = rankopt.load_compressed(folder / "model.pt")
        assert rankopt.count(model, (1, 1, 8, 8)).params == metrics["params"]
        assert (store / "two" / "trials" / str(t.number) / "model.pt").is_file()
    # picked on the driver's machine (in this process: a `rankopt pick` process each cost
    # seconds of imports; the cluster is gone, so nothing comes from it now)
    from rankopt.cli import main

    for n in range(2):
        assert main(["pick", str(run_a), "--trial", str(n), "--out", str(picked / f"{n}.pt")]) == 0
        assert rankopt.load_compressed(picked / f"{n}.pt") is not None
    # the reference was trained as a Ray task (on the second node) and put in the store
    ref = json.loads((run_a / "reference" / "metrics.json").read_text())
    stored_ref = json.loads((store / "two" / "reference" / "metrics.json").read_text())
    assert ref["weights_sha256"] == stored_ref["weights_sha256"]
    assert {t.user_attrs["reference_weights"] for t in trials} == {ref["weights_sha256"]}

    # the killed worker's trial: FAIL with a reason, folder cleaned, replaced; exit 3
    out_b = (tmp_path / "b.out").read_text()
    assert (tmp_path / "killed").is_file(), out_b[-3000:]
    assert (tmp_path / "b.rc").read_text().strip() == "3", out_b[-3000:]
    assert "Traceback" not in out_b and "RayActorError" not in out_b.split("warning:")[0], out_b
    assert "worker died" in out_b
    states = {t.number: t for t in StudyResult(run_b).study.trials}
    failed = [t for t in states.values() if t.state.name == "FAIL"]
    assert len(failed) == 1, [(t.number, t.state.name, t.user_attrs.get("reason")) for t in states.values()]
    # the node and Ray's cause are named
    assert failed[0].user_attrs["reason"].startswith("worker died on node "), failed[0].user_attrs
    assert "Worker exit" in failed[0].user_attrs["reason"] or "died" in failed[0].user_attrs["reason"]
    assert sum(t.state.name == "COMPLETE" for t in states.values()) == 2  # replaced
    folder = run_b / "trials" / str(failed[0].number)
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.json"]
    assert json.loads((folder / "metrics.json").read_text())["reason"].startswith("worker died")
    ray_log = (run_b / "ray.log").read_text()
    assert "worker died" in ray_log or "RayActorError" in ray_log or "ActorDiedError" in ray_log


# -- several drivers on one PostgreSQL study ---------------------------------------------------


def rankopt_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rankopt", *args]


def machine_env(**extra: str) -> dict[str, str]:
    root = Path(__file__).resolve().parents[1]
    return {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), **extra}


def on_machine(name: str, command: list[str]) -> list[str]:
    """``command`` as if on another machine: its own host name (UTS namespace) and PID
    namespace (so its Ray processes end with it)."""
    return ["unshare", "-u", "-p", "-f", "--kill-child", "--mount-proc", "sh", "-c",
            f'hostname {name} && exec "$@"', "sh", *command]


@pytest.mark.slow
def test_ray_and_local_drivers_share_a_postgres_study_and_a_dead_driver_is_failed_by_heartbeat(
    tmp_path: Path,
) -> None:
    import optuna

    require_namespaces()
    url = postgres_url()
    name = f"scale-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    run_a, run_b = tmp_path / "machineA" / "run", tmp_path / "machineB" / "run"
    common = dict(storage=url, artifacts=str(store), trials=4)
    a = write(tmp_path / "a.yaml", study(name, run_a, max_concurrent=1,
                                         strategies={"finetune": {"epochs": 4, "lr": 0.02}}, **common))
    b = write(tmp_path / "b.yaml", study(name, run_b, backend="local", max_concurrent=1, **common))
    beat = machine_env(RANKOPT_HEARTBEAT_INTERVAL="1", RANKOPT_GRACE_PERIOD="10")
    try:
        # machine A (the ray backend) runs until a trial is done and the next is running
        driver = subprocess.Popen(on_machine("machineA", rankopt_cli("run", str(a), "-q")),
                                  env=beat, cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        from rankopt.search.storage import open_storage

        storage = open_storage(url)

        def states() -> list[str]:
            try:
                trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            except KeyError:
                return []
            return [t.state.name for t in trials]

        end = time.monotonic() + 240
        while not (states().count("COMPLETE") >= 1 and "RUNNING" in states()):
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < end, states()
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)  # the namespace's init: all its processes go
        driver.wait(30)
        running = [i for i, s in enumerate(states()) if s == "RUNNING"]
        assert running
        # machine B (the local backend, another host name: no PID check applies) fails
        # A's trial once its heartbeat is over the grace period, and finishes the count
        try:
            rerun = subprocess.run(on_machine("machineB", rankopt_cli("run", str(b), "-q")),
                                   env=beat, cwd=tmp_path, capture_output=True, text=True,
                                   timeout=240)
        except subprocess.TimeoutExpired as exc:
            trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
            raise AssertionError(
                f"machine B did not finish: {[(t.number, t.state.name, t.user_attrs.get('worker')) for t in trials]}"
                f"\n{exc.stdout!r}\n{exc.stderr!r}") from None
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        by_state = {s: [t for t in trials if t.state.name == s] for s in ("COMPLETE", "FAIL", "RUNNING")}
        assert len(by_state["COMPLETE"]) == 4 and not by_state["RUNNING"]
        dead = [t for t in by_state["FAIL"] if t.number in running]
        assert dead and dead[0].user_attrs["reason"].startswith("worker died: no heartbeat")
        assert {t.user_attrs["worker"].split(":")[0] for t in by_state["COMPLETE"]} == {"machineA", "machineB"}
        # each machine picks the other's trials through the artifact store
        for run_dir in (run_a, run_b):
            result = StudyResult(run_dir)
            for t in by_state["COMPLETE"]:
                model = result.load_model(t.number)
                assert rankopt.count(model, (1, 1, 8, 8)).params == t.user_attrs["params"]
                # fetched here (a repeat's model is its original's: repeat_of)
                assert Path(result.pick(trial=t.number).model_path).is_file()
    finally:
        try:
            optuna.delete_study(study_name=name, storage=url)
        except KeyError:
            pass


# -- fast checks --------------------------------------------------------------------------------


def test_a_stale_trial_whose_pid_now_belongs_to_a_live_process_is_detected(tmp_path: Path) -> None:
    import socket

    import optuna

    from rankopt.search.storage import (
        STALE_REASON,
        WORKER_ATTR,
        _start_time,
        default_storage_url,
        fail_stale_trials,
        open_storage,
        worker_id,
    )

    storage = open_storage(default_storage_url(tmp_path))
    study_ = optuna.create_study(study_name="pids", storage=storage)
    host = socket.gethostname()
    live = subprocess.Popen(["sleep", "60"])  # an unrelated live process
    try:
        start = _start_time(live.pid)
        assert start is not None
        workers = {
            "reused": f"{host}:{live.pid}:{start - 1}",  # its PID, another start time
            "pid1": f"{host}:1:{_start_time(1) + 1}",  # a restarted container's PID 1
            "alive": f"{host}:{live.pid}:{start}",  # that very process
            "me": worker_id(),
            "elsewhere": f"another-host:{live.pid}:{start - 1}",  # not ours to judge
        }
        numbers = {}
        for label, worker in workers.items():
            trial = study_.ask()
            trial.set_user_attr(WORKER_ATTR, worker)
            numbers[trial.number] = label
        failed = fail_stale_trials(study_, storage, local=True)
        assert sorted(numbers[n] for n in failed) == ["pid1", "reused"]
        for t in study_.get_trials():
            expected = "FAIL" if numbers[t.number] in ("pid1", "reused") else "RUNNING"
            assert t.state.name == expected, numbers[t.number]
            if expected == "FAIL":
                assert t.user_attrs["reason"] == STALE_REASON
    finally:
        live.kill()
        live.wait()


def test_worker_id_names_host_pid_start_boot_and_pid_namespace() -> None:
    import socket

    from rankopt.search.storage import _start_time, worker_id

    host, pid, start, boot, pidns = worker_id().split(":")
    assert host == socket.gethostname() and int(pid) == os.getpid()
    assert int(start) == _start_time(os.getpid()) > 0
    assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert int(pidns) == os.stat("/proc/self/ns/pid").st_ino


def test_artifact_store_round_trip_and_bad_urls(tmp_path: Path) -> None:
    from rankopt.config.schema import load_config
    from rankopt.core.errors import ConfigError
    from rankopt.search.artifact_store import ArtifactStore

    store = ArtifactStore(str(tmp_path / "store"), "s")
    assert not store.fetch_trial(0, tmp_path / "here" / "0")
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.pt").write_bytes(b"\x00weights" * 100)
    (src / "metrics.json").write_text('{"state": "COMPLETE"}')
    import pickle

    pickle.loads(pickle.dumps(store)).put_trial(7, src)  # as a Ray worker would
    assert store.fetch_trial(7, tmp_path / "here" / "7")
    assert (tmp_path / "here" / "7" / "model.pt").read_bytes() == b"\x00weights" * 100
    assert not list((tmp_path / "store" / "s" / "trials" / "7").glob(".*"))  # no temporaries
    with pytest.raises(ConfigError, match=r"artifacts.*'nope'.*fsspec"):
        load_config(study("x", tmp_path / "run", artifacts="nope://bucket/x"))
    config = load_config(study("x", tmp_path / "run", artifacts="relative/store"))
    assert config.artifacts == os.path.abspath("relative/store")


@pytest.mark.slow
def test_ray_and_local_drivers_at_once_finish_exactly_the_count(tmp_path: Path) -> None:
    import optuna

    require_namespaces()
    url = postgres_url()
    name = f"both-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    run_a, run_b = tmp_path / "machineA" / "run", tmp_path / "machineB" / "run"
    # multi_fidelity off: its continuations would be trials beyond the count
    common = dict(storage=url, artifacts=str(store), trials=8, multi_fidelity=None)
    a = write(tmp_path / "a.yaml", study(name, run_a, max_concurrent=2,
                                         strategies={"finetune": {"epochs": 4, "lr": 0.02}}, **common))
    b = write(tmp_path / "b.yaml", study(name, run_b, backend="local", max_concurrent=1, **common))
    from rankopt.search.storage import WITHDRAWN_REASON, open_storage

    storage = open_storage(url)

    def running() -> bool:
        try:
            trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        except KeyError:
            return False
        return any(t.state.name == "RUNNING" for t in trials)

    def start(host: str, path: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(on_machine(host, rankopt_cli("run", str(path), "-q")),
                                env=machine_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    try:
        # machine B joins once machine A (the ray backend, slower trials) is running
        procs = [start("machineA", a)]
        end = time.monotonic() + 240
        while not running():
            assert procs[0].poll() is None and time.monotonic() < end
            time.sleep(0.2)
        procs.append(start("machineB", b))
        for proc in procs:
            out, _ = proc.communicate(timeout=400)
            assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        assert len(complete) == 8, [(t.number, t.state.name) for t in trials]
        assert not [t for t in trials if t.state.name in ("RUNNING", "FAIL")]
        # a trial that raced past the count on the other machine was withdrawn, not run
        assert all(t.user_attrs.get("reason") == WITHDRAWN_REASON
                   for t in trials if t.state.name == "PRUNED")
        assert {t.user_attrs["worker"].split(":")[0] for t in complete} == {"machineA", "machineB"}
        for run_dir in (run_a, run_b):
            result = StudyResult(run_dir)
            for t in complete:
                assert result.load_model(t.number) is not None
    finally:
        try:
            optuna.delete_study(study_name=name, storage=url)
        except KeyError:
            pass
