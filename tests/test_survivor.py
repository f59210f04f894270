"""A survivor that finishes the job (issue 28, item 8): two drivers on one PostgreSQL
study, one SIGKILLed with a trial running; the other waits for that trial's lease to
expire, fails it and runs the missing trial, and never exits 0 short.

Before: the survivor exited 0 at "COMPLETE 5, RUNNING 1 of 6 wanted" whenever the dead
driver's heartbeat was not yet overdue (any death in the last 120 s of a run).
"""

from __future__ import annotations

import os
import subprocess
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

pytestmark = pytest.mark.slow

TRIALS = 4


def on_machine(name: str, command: list[str]) -> list[str]:
    """``command`` as if on another machine: its own host name and PID namespace."""
    return ["unshare", "-u", "-p", "-f", "--kill-child", "--mount-proc", "sh", "-c",
            f'hostname {name} && exec "$@"', "sh", *command]


def test_a_survivor_waits_for_the_dead_drivers_lease_and_finishes_the_count(tmp_path: Path) -> None:
    url = postgres_url()
    name = f"survivor-{uuid.uuid4().hex[:8]}"
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump(tiny_study(
        name=name, run_dir=str(tmp_path / "run"), trials=TRIALS, storage=url,
        strategies={"slow": {"sleep": 4.0}})))
    # short leases, so that the test waits seconds rather than minutes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANKOPT_HEARTBEAT_INTERVAL": "1",
           "RANKOPT_GRACE_PERIOD": "8"}
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
        wait_for(lambda: len(storage_trials(tmp_path / "run", name, url)) >= 2, 300,
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
        assert "waiting for" in text and "lease expires in" in text, text[-3000:]
    finally:
        if victim.poll() is None:
            kill_group(victim)
        if survivor is not None and survivor.poll() is None:
            survivor.kill()
        try:
            optuna.delete_study(study_name=name, storage=open_storage(url))
        except KeyError:
            pass
