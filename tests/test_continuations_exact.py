"""Exact continuations with several drivers (issue 28, items 5 and 9): each source is
continued once (claimed atomically in the storage), the rung is promoted once full, and
a continuation fetches its source's model from the artifact store when it is not on disk.

Before: two processes on SQLite continued 5 models instead of 4; on PostgreSQL 6 instead
of 3 in one run directory, and 5 instead of 3 across two, 3 of them failing with
"model file .../model.pt does not exist".
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from rankopt.search.storage import open_storage
from reliability_support import cli_command, postgres_url, storage_trials, tiny_study

pytestmark = pytest.mark.slow

SEARCHED, KEEP = 6, 0.5
CONTINUED = 3  # ceil(0.5 * 6)


def mf_study(run_dir: Path, sleep: float = 0.0, **changes: Any) -> dict[str, Any]:
    # ``sleep`` (seconds before each trial trains) keeps one driver from running every
    # trial before the other has started, when the machine is busy
    strategy = {"slow": {"sleep": sleep, "epochs": 0.2, "lr": 0.02}} if sleep else {
        "finetune": {"epochs": 0.2, "lr": 0.02}}
    return tiny_study(run_dir=str(run_dir), trials=SEARCHED, strategies=strategy,
                      multi_fidelity={"rounds": 1, "epochs": 0.2, "keep": KEEP}, **changes)


def run_drivers(tmp_path: Path, studies: list[dict[str, Any]]) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for i, study in enumerate(studies):
        path = tmp_path / f"study{i}.yaml"
        path.write_text(yaml.safe_dump(study))
        procs.append(subprocess.Popen(cli_command("run", str(path), "--quiet"), cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        outputs.append(out.decode(errors="replace"))
        assert proc.returncode == 0, outputs[-1][-3000:]
    return outputs


def check_counts(trials: list[optuna.trial.FrozenTrial]) -> None:
    done = [t for t in trials if t.state.name == "COMPLETE"]
    searched = [t for t in done if t.user_attrs.get("continued_from") is None]
    continued = [t for t in done if t.user_attrs.get("continued_from") is not None]
    assert len(searched) == SEARCHED, [(t.number, t.state.name, t.user_attrs.get("reason")) for t in trials]
    assert len(continued) == CONTINUED, [(t.number, t.state.name, t.user_attrs) for t in continued]
    sources = [t.user_attrs["continued_from"] for t in continued]
    assert len(set(sources)) == CONTINUED  # no source continued twice
    assert not [t for t in trials if t.state.name in ("FAIL", "RUNNING")]
    withdrawn = [t for t in trials if t.state.name == "PRUNED"]
    assert all(str(t.user_attrs.get("reason", "")).startswith("withdrawn") for t in withdrawn)


def test_two_drivers_on_sqlite_continue_each_model_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_drivers(tmp_path, [mf_study(run_dir, sleep=1.0)] * 2)
    trials = storage_trials(run_dir, "rely")
    check_counts(trials)
    assert len({t.user_attrs["worker"] for t in trials if t.state.name == "COMPLETE"}) == 2


def test_two_drivers_on_postgres_continue_each_model_once(tmp_path: Path) -> None:
    url = postgres_url()
    name = f"mf-{uuid.uuid4().hex[:8]}"
    try:
        # one run directory (one machine), then two run directories sharing only the
        # storage and an artifact store (two machines): a continuation fetches its source
        run_drivers(tmp_path, [mf_study(tmp_path / "run", name=name, storage=url)] * 2)
        check_counts(storage_trials(tmp_path / "run", name, url))
        store = tmp_path / "store"
        name2 = f"{name}-b"
        run_drivers(tmp_path, [mf_study(tmp_path / f"run{i}", name=name2, storage=url,
                                        artifacts=str(store)) for i in range(2)])
        check_counts(storage_trials(tmp_path / "run0", name2, url))
    finally:
        for study_name in (name, f"{name}-b"):
            try:
                optuna.delete_study(study_name=study_name, storage=open_storage(url))
            except KeyError:
                pass
