"""Resume: a rerun continues a study; completed trials are never run twice."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import optuna
import pytest

import rankopt
from rankopt.core.errors import ConfigError
from rankopt.search.storage import default_storage_url, open_storage
from study_support import digits_study


def tiny(run_dir: Path, **changes: object) -> dict:
    return digits_study("resume", run_dir, **{"selectors": {"energy": {"p": {"low": 0.6, "high": 0.95}}},
                                              "strategies": {"finetune": {"epochs": 0.1, "lr": 0.02}}, **changes})


def stamps(run_dir: Path) -> dict[int, int]:
    """trial number -> mtime (ns) of its metrics.json."""
    return {
        int(p.parent.name): p.stat().st_mtime_ns for p in (run_dir / "trials").glob("*/metrics.json")
    }


def states(run_dir: Path) -> list[str]:
    study = optuna.load_study(study_name="resume", storage=open_storage(default_storage_url(run_dir)))
    return [t.state.name for t in study.trials]


def test_rerun_runs_only_the_missing_trials(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rankopt.run_study(tiny(run_dir))
    first = stamps(run_dir)
    ref_mtime = (run_dir / "reference" / "model.pt").stat().st_mtime_ns
    assert sorted(first) == [0, 1]

    # a finished study: nothing runs, the reference is not retrained
    rankopt.run_study(tiny(run_dir))
    assert stamps(run_dir) == first
    assert (run_dir / "reference" / "model.pt").stat().st_mtime_ns == ref_mtime

    # asking for more trials runs only the new one
    result = rankopt.run_study(tiny(run_dir, trials=3))
    after = stamps(run_dir)
    assert sorted(after) == [0, 1, 2]
    assert {k: after[k] for k in first} == first
    assert states(run_dir) == ["COMPLETE"] * 3
    assert len(result.trials()) == 3

    # a changed reference config would mix baselines: refused before any work
    with pytest.raises(ConfigError, match=r"reference.epochs 1.0 -> 2.0.*new --run-dir"):
        rankopt.run_study(tiny(run_dir, trials=4, reference={"epochs": 2, "lr": 0.05}))
    assert sorted(stamps(run_dir)) == [0, 1, 2]


def test_interrupted_run_fails_stale_trials_and_reruns_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rankopt.run_study(tiny(run_dir))
    first = stamps(run_dir)
    # a process died mid-trial: its trial stays RUNNING and its lock file stays behind
    study = optuna.load_study(study_name="resume", storage=open_storage(default_storage_url(run_dir)))
    dead = study.ask()
    (run_dir / "run.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    assert states(run_dir) == ["COMPLETE", "COMPLETE", "RUNNING"]

    result = rankopt.run_study(tiny(run_dir, trials=3))
    assert states(run_dir) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert result.study.trials[dead.number].user_attrs["fail_reason"].startswith("left running")
    after = stamps(run_dir)
    assert {k: after[k] for k in first} == first  # completed trials were not rerun
    assert 3 in after and 2 not in after
    assert not (run_dir / "run.lock").exists()


def test_a_live_workers_trial_is_left_running(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rankopt.run_study(tiny(run_dir, trials=1))
    # a live process on this machine (the test's parent stands in for it) runs a trial
    study = optuna.load_study(study_name="resume", storage=open_storage(default_storage_url(run_dir)))
    live = study.ask()
    live.set_user_attr("worker", f"{socket.gethostname()}:{os.getppid()}")
    storage = study._storage

    def live_worker_finishes() -> None:  # once the joiner has run its own trial
        while states(run_dir)[2:] != ["COMPLETE"]:
            time.sleep(0.2)
        for key, value in {"accuracy": 0.5, "params": 100, "flops": 1000}.items():
            storage.set_trial_user_attr(live._trial_id, key, value)
        storage.set_trial_state_values(live._trial_id, optuna.trial.TrialState.COMPLETE,
                                       [0.5, 100.0, 1000.0])

    finisher = threading.Thread(target=live_worker_finishes, daemon=True)
    finisher.start()
    # another process joins the study: it never fails the live trial, nor runs its share;
    # it does not end short either: it waits for the live worker's trial (issue 28, item 8)
    rankopt.run_study(tiny(run_dir, trials=3))
    finisher.join(timeout=5)
    assert states(run_dir) == ["COMPLETE", "COMPLETE", "COMPLETE"]


def test_failed_trials_are_recorded_and_do_not_count(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # lr 1e6 makes the loss blow up: every trial fails, and the run says so (exit 1)
    with pytest.raises(rankopt.RankoptError, match="all 2 trials of study 'resume' failed"):
        rankopt.run_study(tiny(run_dir, strategies={"finetune": {"epochs": 0.3, "lr": 1e6}},
                               seed_proposals=False))
    assert states(run_dir) == ["FAIL", "FAIL"]
    metrics = json.loads((run_dir / "trials" / "0" / "metrics.json").read_text())
    assert metrics["state"] == "FAIL" and "TrainingDivergedError" in metrics["reason"]
    # failed trials are not "done": a rerun with a working config runs two more
    rankopt.run_study(tiny(run_dir))
    assert states(run_dir) == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
