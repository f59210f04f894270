"""Failing trials (issue 7, point 2): a trial that raises is stored as FAIL with its reason,
its partial files are removed, the study goes on, and ``max_failures`` stops it.

Faults come from in-process plugins registered through the public API (see
``reliability_support``): a strategy that fails on demand and a decomposer that diverges.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import rankopt
import reliability_support
from rankopt.cli import main
from rankopt.contract.manager import reset_registry
from rankopt.results.report import write_report
from reliability_support import tiny_study

# every conv/linear layer of small_cnn(width=8), so enqueued trials pin all decomposers
HEALTHY_LAYERS = {"decomposer.0": "tucker2", "decomposer.3": "tucker2", "decomposer.7": "tucker2",
                  "decomposer.12": "svd"}
FAULT_PLAN = [
    # (enqueued point, expected state, expected exception in the reason)
    ({"faulty.fault": "none"}, "COMPLETE", None),
    ({"faulty.fault": "nan_loss"}, "FAIL", "TrainingDivergedError"),
    ({"faulty.fault": "oom"}, "FAIL", "OutOfMemoryError"),
    ({"faulty.fault": "plugin_error"}, "FAIL", "PluginError"),
    ({"faulty.fault": "cp_divergence"}, "FAIL", "DecompositionError"),
    ({"faulty.fault": "disk_full"}, "FAIL", "DiskFullError: no space left on the device writing"),  # names the path (issue 26)
    ({"faulty.fault": "none", "decomposer.12": "diverging_cp"}, "FAIL", "DecompositionError"),
    ({"faulty.fault": "none"}, "COMPLETE", None),
]


@pytest.fixture
def fault_plugins() -> Iterator[None]:
    rankopt.register_plugin(reliability_support)
    yield
    reset_registry()


def faulty_study(run_dir: Path, plan: list, **changes: object) -> dict:
    return tiny_study(
        run_dir=str(run_dir),
        decomposers=["tucker2", "svd", "diverging_cp"],
        strategies={"faulty": {"fault": {"choices": list(reliability_support.FAULTS)}}},
        # a distinct energy.p each: Optuna skips an enqueued point equal to an earlier one
        enqueue=[{**HEALTHY_LAYERS, "energy.p": 0.6 + 0.01 * i, **point}
                 for i, (point, _, _) in enumerate(plan)],
        trials=len(plan),
        **changes,
    )


def test_failing_trials_are_recorded_cleaned_and_the_study_goes_on(tmp_path: Path, fault_plugins: None) -> None:
    run_dir = tmp_path / "run"
    result = rankopt.run_study(faulty_study(run_dir, FAULT_PLAN))

    trials = result.study.trials
    assert [t.state.name for t in trials] == [state for _, state, _ in FAULT_PLAN]
    for trial, (_, state, error) in zip(trials, FAULT_PLAN):
        folder = run_dir / "trials" / str(trial.number)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["state"] == state
        if state == "FAIL":
            assert trial.user_attrs["reason"].startswith(error), trial.user_attrs["reason"]
            assert metrics["reason"] == trial.user_attrs["reason"]
            # partial files (the half-written model of disk_full included) are gone
            assert sorted(p.name for p in folder.iterdir()) == ["metrics.json"]
        else:
            assert rankopt.load_compressed(folder / "model.pt") is not None

    # the front, status and report see the completed trials only, and count the others
    assert {r.trial for r in result.front()} <= {0, 7}
    assert {r.trial for r in result.trials()} == {0, 7}
    assert result.status()["trials"] == {"COMPLETE": 2, "FAIL": 6}
    write_report(result)
    assert "FAIL 6" in (run_dir / "report" / "summary.md").read_text()


def test_max_failures_stops_the_study_with_a_clear_message(
    tmp_path: Path, fault_plugins: None, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    plan = [({"faulty.fault": "none"}, None, None)] + [({"faulty.fault": "oom"}, None, None)] * 5
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(faulty_study(run_dir, plan, max_failures=2)))

    code = main(["run", str(study_file), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "stopped: 2 of its 3 trials in this run failed (max_failures: 2)" in err
    assert "OutOfMemoryError" in err
    status = rankopt.StudyResult(run_dir).status()
    # no trial started after the limit; the remaining enqueued points wait for a rerun
    assert status["trials"] == {"COMPLETE": 1, "FAIL": 2, "WAITING": 3}
