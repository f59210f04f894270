"""Models come home with zero configuration (issue 28, item 2): on two nodes with no shared
file system and no ``artifacts:``, every trial's model reaches the driver through Ray (an
actor on the driver's node) and is picked and loaded there.

Continuations (multi_fidelity) run there too, as Ray tasks with the study's resources
(item 6). Before: 6 trials asked became 12 started and 10 failed with "its model did not reach this
machine; set artifacts: ...", exit 3.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

import rankopt
from rankopt.results.reading import StudyResult
from ray_cluster_support import require_namespaces, run_in_cluster

pytest.importorskip("ray")


def study(run_dir: Path, **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "home", "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits", "batch_size": 128}, "reference": {"epochs": 1, "lr": 0.05},
        "decomposers": ["tucker2", "svd"], "selectors": {"energy": {"p": {"low": 0.5, "high": 0.95}}},
        "strategies": {"finetune": {"epochs": 0.2, "lr": 0.02}},
        "sampler": {"name": "random", "seed": 0}, "trials": 4, "backend": "ray",
        "max_concurrent": 2, "resources": {"cpus": 1, "gpus": 0}, "run_dir": str(run_dir),
    }
    base.update(changes)
    return base


@pytest.mark.slow
def test_models_reach_the_driver_through_ray_without_an_artifact_store(tmp_path: Path) -> None:
    require_namespaces()
    machine = tmp_path / "machineA"  # the second node sees an empty folder here
    run_dir = machine / "run"
    machine.mkdir()
    study_file = tmp_path / "s.yaml"
    # two trials side by side and a continuation (multi_fidelity), which runs on the
    # cluster too, not in the driver (four trials showed nothing more; suite time)
    study_file.write_text(yaml.safe_dump(study(
        run_dir, trials=2, multi_fidelity={"rounds": 1, "epochs": 0.2, "keep": 0.5})))
    picked = tmp_path / "picked"
    script = f"""
cd {tmp_path}
rankopt run {study_file} -q > run.out 2>&1; echo $? > run.rc
"""
    proc = run_in_cluster(script, tmp=tmp_path, hide=machine)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = (tmp_path / "run.out").read_text()
    assert (tmp_path / "run.rc").read_text().strip() == "0", out[-3000:]
    trials = StudyResult(run_dir).study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # none failed, none replaced
    continued = [t for t in trials if t.user_attrs.get("continued_from") is not None]
    assert len(continued) == 1
    for t in trials:
        folder = run_dir / "trials" / str(t.number)
        metrics = json.loads((folder / "metrics.json").read_text())
        model = rankopt.load_compressed(folder / "model.pt")
        assert rankopt.count(model, (1, 1, 8, 8)).params == metrics["params"]
        # it ran on the second node (the head has no CPUs: continuations too, with the
        # study's resources) and came home through Ray
        assert t.user_attrs.get("transfer_bytes", 0) >= (folder / "model.pt").stat().st_size
    # picked on the driver's machine (in this process: a `rankopt pick` process each cost
    # seconds of imports; the cluster is gone, so nothing comes from it now)
    from rankopt.cli import main

    for n in range(2):  # the searched trials
        assert main(["pick", str(run_dir), "--trial", str(n), "--out", str(picked / f"{n}.pt")]) == 0
        assert rankopt.load_compressed(picked / f"{n}.pt") is not None


def test_a_ray_client_driver_without_artifacts_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rankopt.core.errors import ConfigError
    from rankopt.search import ray_checks
    from rankopt.search.ray_inbox import start_inbox

    # a ray:// client is not a node of the cluster: no actor can be pinned beside it
    monkeypatch.setattr(ray_checks, "is_ray_client", lambda: True)
    with pytest.raises(ConfigError, match=r"^artifacts: this driver is a Ray client \(ray://\)") as info:
        start_inbox(tmp_path)
    assert "\n" not in str(info.value)
