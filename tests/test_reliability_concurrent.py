"""Concurrent workers (issue 7, point 4): two ``rankopt run`` processes on one study, with
the embedded SQLite storage and with a PostgreSQL server; no trial is lost or run twice
and the trial count is exact.

The PostgreSQL variant reads the server from ``RANKOPT_TEST_POSTGRES_URL`` (``.ci/run``
installs Debian's ``postgresql`` and exports it) and skips, saying why, without one.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import yaml

import rankopt
from reliability_support import (
    cli_command,
    postgres_url,
    sqlite_integrity,
    storage_trials,
    tiny_study,
    trial_metrics,
)



def run_two_workers(tmp_path: Path, study: dict) -> list[str]:
    """Start two ``rankopt run`` on the same study file at once; return their outputs."""
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cli_command("run", str(path), "--quiet"), cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        outputs.append(out.decode(errors="replace"))
        assert proc.returncode == 0, outputs[-1][-3000:]
    return outputs


def check_exact(run_dir: Path, trials: int, name: str, url: str | None = None) -> None:
    stored = storage_trials(run_dir, name, url)
    assert [t.state.name for t in stored] == ["COMPLETE"] * trials  # none lost, none extra
    assert sorted(t.number for t in stored) == list(range(trials))
    metrics = trial_metrics(run_dir)
    assert sorted(metrics) == list(range(trials))  # one folder per trial, each written once
    assert all(m["state"] == "COMPLETE" for m in metrics.values())
    # the same parameters never ran twice, and both processes did trials
    params = [tuple(sorted(t.params.items())) for t in stored]
    assert len(set(params)) == trials
    workers = {t.user_attrs["worker"] for t in stored}
    assert len(workers) == 2, workers
    for t in stored:
        assert rankopt.load_compressed(run_dir / "trials" / str(t.number) / "model.pt") is not None


def test_two_workers_share_the_embedded_storage(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trials = 6
    run_two_workers(tmp_path, tiny_study(run_dir=str(run_dir), trials=trials,
                                         strategies={"slow": {"sleep": 0.6}}))
    check_exact(run_dir, trials, "rely")
    assert sqlite_integrity(run_dir) == "ok"
    # the reference was trained once, and both used it
    assert len(list((run_dir / "reference").glob("model.pt"))) == 1
    assert not (run_dir / "run.lock").exists()


def test_two_workers_share_a_postgres_storage(tmp_path: Path) -> None:
    import optuna

    url = postgres_url()
    name = f"rely-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    trials = 6
    try:
        run_two_workers(tmp_path, tiny_study(name=name, run_dir=str(run_dir), trials=trials,
                                             storage=url, strategies={"slow": {"sleep": 0.6}}))
        check_exact(run_dir, trials, name, url)
        assert not (run_dir / "optuna.db").exists()  # everything went to the server
    finally:
        try:
            optuna.delete_study(study_name=name, storage=url)
        except KeyError:
            pass
