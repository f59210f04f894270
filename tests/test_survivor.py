"""A survivor that finishes the job (issue 28, item 8): two drivers on one PostgreSQL
study, one SIGKILLed with a trial running; the other waits for that trial's lease to
expire, fails it and runs the missing trial, and never exits 0 short.

Before: the survivor exited 0 at "COMPLETE 5, RUNNING 1 of 6 wanted" whenever the dead
driver's heartbeat was not yet overdue (any death in the last 120 s of a run).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from rankopt.search.storage import open_storage
from ray_cluster_support import require_namespaces
from reliability_support import (
    cli_command,
    kill_group,
    postgres_url,
    storage_trials,
    tiny_study,
    wait_for,
)


TRIALS = 2


def on_machine(name: str, command: list[str]) -> list[str]:
    """``command`` as if on another machine: its own host name and PID namespace."""
    return ["unshare", "-u", "-p", "-f", "--kill-child", "--mount-proc", "sh", "-c",
            f'hostname {name} && exec "$@"', "sh", *command]


@pytest.mark.slow
def test_a_survivor_finishes_the_count_when_the_other_driver_dies(tmp_path: Path) -> None:
    url = postgres_url()
    name = f"survivor-{uuid.uuid4().hex[:8]}"
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump(tiny_study(
        name=name, run_dir=str(tmp_path / "run"), trials=TRIALS, storage=url,
        strategies={"slow": {"sleep": 4.0}})))
    # leases of 20 s, beaten every 10 s: the victim dies while the survivor runs the other
    # trial, so the survivor's count is full (its own COMPLETE, the victim's RUNNING) and
    # the victim's lease still valid when it finishes: the window where it exited 0 short
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANKOPT_HEARTBEAT_INTERVAL": "10",
           "RANKOPT_GRACE_PERIOD": "20"}
    require_namespaces()
    # the victim is "another machine": its own host name and PID namespace, so only its
    # lease (heartbeats) tells the survivor that it died
    victim = subprocess.Popen(on_machine("machineB", cli_command("run", str(study_file))),
                              cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True)
    survivor = None
    try:
        def victim_running() -> bool:
            try:
                trials = storage_trials(tmp_path / "run", name, url)
            except KeyError:
                return False
            return any(t.state.name == "RUNNING"
                       and str(t.user_attrs.get("worker", "")).startswith("machineB:")
                       for t in trials)

        wait_for(victim_running, 300, "the first driver to run a trial", victim)
        survivor = subprocess.Popen(cli_command("run", str(study_file)), cwd=tmp_path, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        # the survivor is set up (its reference loaded) before the victim dies
        wait_for(lambda: len(storage_trials(tmp_path / "run", name, url)) >= TRIALS, 300,
                 "the second driver to start a trial", survivor)
        kill_group(victim)
        out, _ = survivor.communicate(timeout=600)
        text = out.decode(errors="replace")
        assert survivor.returncode == 0, text[-3000:]
        trials = storage_trials(tmp_path / "run", name, url)
        states = [t.state.name for t in trials]
        assert states.count("COMPLETE") == TRIALS and "RUNNING" not in states, states
        dead = [t for t in trials if t.state.name == "FAIL"]
        assert dead and all("no heartbeat" in str(t.user_attrs.get("reason")) for t in dead)
    finally:
        if victim.poll() is None:
            kill_group(victim)
        if survivor is not None and survivor.poll() is None:
            survivor.kill()
        try:
            optuna.delete_study(study_name=name, storage=open_storage(url))
        except KeyError:
            pass


def test_a_survivor_waits_out_the_lease_of_a_live_looking_trial_then_fails_it(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window of the report: the dead driver's heartbeat is recent, the survivor's own
    trials are done. It waits (saying how long the lease has left), the trial is failed
    once its lease expires, and the survivor is told to run the missing one."""
    from rankopt.search import storage as storage_mod
    from rankopt.search.owed import wait_for_owed

    url = postgres_url()
    monkeypatch.setattr(storage_mod, "GRACE_PERIOD", 4)
    storage = open_storage(url)
    name = f"lease-{uuid.uuid4().hex[:8]}"
    study = optuna.create_study(study_name=name, storage=storage)
    try:
        theirs = study.ask()
        theirs.set_user_attr("worker", "machineB:4242:99:boot:4026531836")
        storage.record_heartbeat(theirs._trial_id)  # it beat just now, then died
        said: list[str] = []
        start = time.monotonic()
        assert wait_for_owed(study, url, storage_mod.worker_id(), said.append) is True
        assert 3 <= time.monotonic() - start < 30
        assert said and "1 trial(s) of worker machineB:4242" in said[0]
        assert "lease expires in" in said[0]
        trial = study.trials[theirs.number]
        assert trial.state.name == "FAIL" and "no heartbeat" in trial.user_attrs["reason"]
        assert wait_for_owed(study, url, storage_mod.worker_id()) is False  # nothing owed
    finally:
        optuna.delete_study(study_name=name, storage=storage)


def test_without_leases_a_worker_that_cannot_be_seen_stops_the_survivor_in_one_line(
    tmp_path: Path
) -> None:
    from rankopt.search.owed import TrialsOwed, wait_for_owed
    from rankopt.search.storage import default_storage_url, worker_id

    url = default_storage_url(tmp_path)
    study = optuna.create_study(study_name="blind", storage=open_storage(url))
    theirs = study.ask()
    # the same host, another PID namespace (a second container on the volume)
    host, pid, start, boot, _ = worker_id().split(":")
    theirs.set_user_attr("worker", f"{host}:7:{start}:{boot}:1")
    with pytest.raises(TrialsOwed, match=r"^1 trial\(s\) still owed to worker .*rerun to finish"):
        wait_for_owed(study, url, worker_id())
    assert study.trials[0].state.name == "RUNNING"  # never failed by PID
