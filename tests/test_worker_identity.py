"""Worker identity that survives containers (issue 28, item 9): a worker in another PID
namespace with the same host name (two containers on one volume, ``--uts=host``) is never
judged by its PID, and a worker whose trial another one failed meanwhile goes on.

Before: the host process failed the other's running trial as "left running by a process
that died", and the other then crashed with ``ValueError: Cannot tell a FAIL trial.``
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest

import rankopt
from rankopt.search import local
from rankopt.search.storage import (
    WORKER_ATTR,
    default_storage_url,
    fail_stale_trials,
    open_storage,
    worker_id,
)
from ray_cluster_support import ROOT, require_namespaces
from reliability_support import tiny_study


def test_a_worker_in_another_pid_namespace_is_not_judged_by_its_pid(tmp_path: Path) -> None:
    require_namespaces()
    # a "container": its own PID namespace, the same host name; its PID 1 is, out here,
    # the init process, and its own process is gone once it has printed its id
    other = subprocess.run(
        ["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c",
         "from rankopt.search.storage import worker_id; print(worker_id())"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout.strip()
    host, pid, start, boot, pidns = other.split(":")
    mine = worker_id().split(":")
    assert host == mine[0] and boot == mine[3] and pidns != mine[4]
    storage = open_storage(default_storage_url(tmp_path))
    study = optuna.create_study(study_name="containers", storage=storage)
    theirs = study.ask()
    theirs.set_user_attr(WORKER_ATTR, other)
    # the same worker without the namespace fields (an older rankopt): judged by PID
    legacy = study.ask()
    legacy.set_user_attr(WORKER_ATTR, f"{host}:{pid}:{int(start) + 1}")
    assert fail_stale_trials(study, storage, local=True) == [legacy.number]
    assert study.trials[theirs.number].state.name == "RUNNING"


def test_a_trial_failed_by_another_worker_meanwhile_is_handled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = local.run_trial_contained
    calls: list[int] = []

    def judged_dead_meanwhile(env: Any, number: int, values: Any) -> dict[str, Any]:
        metrics = real(env, number, values)
        calls.append(number)
        if len(calls) == 1:  # another worker fails this trial while it runs here
            storage = open_storage(default_storage_url(tmp_path / "run"))
            study_id = storage.get_study_id_from_name("rely")
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
            storage.set_trial_user_attr(trial_id, "reason", "left running by a process that died")
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        return metrics

    monkeypatch.setattr(local, "run_trial_contained", judged_dead_meanwhile)
    result = rankopt.run_study(tiny_study(run_dir=str(tmp_path / "run"), trials=1), progress=False)
    states = [t.state.name for t in result.study.trials]
    assert states == ["FAIL", "COMPLETE"]  # the verdict is kept; a replacement ran
    assert result.study.trials[0].user_attrs["reason"] == "left running by a process that died"
