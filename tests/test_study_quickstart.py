"""The quickstart study end to end on CPU (at 6 trials): front, counts, reloaded models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rankopt
from rankopt.deploy.artifacts import read_compressed
from rankopt.results.reading import StudyResult
from rankopt.training.loop import evaluate, make_loader

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 6


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> StudyResult:
    run_dir = tmp_path_factory.mktemp("quickstart") / "run"
    return rankopt.run_study(ROOT / "studies" / "quickstart.yaml", trials=TRIALS, run_dir=str(run_dir))


def dominates(a: rankopt.results.reading.TrialRecord, b: rankopt.results.reading.TrialRecord) -> bool:
    no_worse = a.accuracy >= b.accuracy and a.params <= b.params and a.flops <= b.flops
    better = a.accuracy > b.accuracy or a.params < b.params or a.flops < b.flops
    return no_worse and better


def test_front_has_at_least_three_non_dominated_points(quickstart: StudyResult) -> None:
    trials = quickstart.trials()
    front = quickstart.front()
    assert len(trials) == TRIALS
    assert len(front) >= 3
    for a in front:
        assert not any(dominates(b, a) for b in trials), f"trial {a.trial} is dominated"
    # and every completed trial off the front is dominated by a front point, or is the
    # uncompressed model (every layer left dense, e.g. by targets.min_saving), or a repeat
    on_front = {r.trial for r in front}
    for t in trials:
        if t.trial not in on_front and t.repeat_of is None and rankopt.results.reading.compressed(t):
            assert any(dominates(f, t) for f in front), t.trial
        elif not rankopt.results.reading.compressed(t):
            assert t.params == quickstart.reference["params"] and t.spec == {}


def test_front_holds_a_3x_smaller_model_within_2_points(quickstart: StudyResult) -> None:
    ref = quickstart.reference
    good = [
        r for r in quickstart.front()
        if r.params * 3 <= ref["params"] and r.accuracy >= ref["accuracy"] - 0.02
    ]
    assert good, (ref, [(r.accuracy, r.params) for r in quickstart.front()])


def test_points_match_count_and_reload_with_their_accuracy(quickstart: StudyResult) -> None:
    splits = rankopt.dataset("digits", **quickstart.config.data.kwargs)  # its test split held out
    loader = make_loader(splits.val, batch_size=256)
    input_shape = tuple(quickstart.reference["input_shape"])
    for rec in quickstart.front():
        model = rankopt.load_compressed(rec.model_path)
        cost = rankopt.count(model, input_shape)
        assert (cost.params, cost.flops) == (rec.params, rec.flops)
        assert rec.params_compression == pytest.approx(quickstart.reference["params"] / rec.params)
        assert evaluate(model, loader, device="cpu") == pytest.approx(rec.accuracy, abs=1e-9)
        # the spec in the file is what the storage says
        payload = read_compressed(rec.model_path)
        assert {k: v["ranks"] for k, v in payload["spec"].items()} == {
            k: v["ranks"] for k, v in rec.spec.items()
        }
        assert payload["base"]["model"] == "small_cnn"


def test_run_directory_is_self_describing(quickstart: StudyResult) -> None:
    run_dir = quickstart.run_dir
    assert (run_dir / "resolved-study.yaml").is_file()  # not study.yaml: the usual input name
    assert (run_dir / "optuna.db").is_file()
    assert (run_dir / "reference" / "model.pt").is_file()
    ref = json.loads((run_dir / "reference" / "metrics.json").read_text())
    assert ref["params"] == rankopt.count(rankopt.model("small_cnn", width=32), (1, 1, 8, 8)).params
    for n in range(TRIALS):
        metrics = json.loads((run_dir / "trials" / str(n) / "metrics.json").read_text())
        assert metrics["state"] == "COMPLETE" and metrics["trial"] == n
        assert metrics["train_seconds"] > 0 and metrics["overhead_seconds"] >= 0
        assert (run_dir / "trials" / str(n) / "model.pt").is_file()
    # a fresh reader with nothing but the directory sees the same front
    again = StudyResult(run_dir)
    assert [r.as_dict() for r in again.front()] == [r.as_dict() for r in quickstart.front()]
    trial = again.study.trials[0]
    for key in ("strategy", "selector", "hyperparameters", "accuracy", "params", "flops",
                "params_compression", "flops_compression", "ranks_summary"):
        assert key in trial.user_attrs


def test_enqueued_proposals_ran_first(quickstart: StudyResult) -> None:
    first = quickstart.study.trials[0]
    assert first.params["energy.p"] == 0.65 and first.params["finetune.lr"] == 0.03
    assert first.params["decomposer.3"] == "tucker2"


def test_status_and_hypervolume(quickstart: StudyResult) -> None:
    status = quickstart.status()
    assert status["trials"] == {"COMPLETE": TRIALS}
    assert set(status["reference"]) == {"accuracy", "params", "flops"}
    for value in status["hypervolume"].values():
        assert 0 < value < 1
    assert status["front_size"] == len(quickstart.front())


def test_torch_threads_follow_resources_and_are_restored() -> None:
    before = torch.get_num_threads()
    with rankopt.study.torch_threads(1.0):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_after_the_quickstart_evaluate_works_and_pareto_fits_80_columns(quickstart: StudyResult) -> None:
    import os
    import subprocess
    import sys

    from rankopt.cli import main

    assert main(["evaluate", str(quickstart.run_dir)]) == 0  # the quickstart holds out a test split
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": os.pathsep.join(sys.path)}
    for extra in ([], ["--ranks"]):
        out = subprocess.run([sys.executable, "-m", "rankopt", "pareto", str(quickstart.run_dir), *extra],
                             capture_output=True, text=True, env=env, check=True, timeout=300).stdout
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= 80, out
        front = quickstart.front()
        rows = [line for line in lines if line.strip()[:1].isdigit()]
        assert len(rows) == len(front), out  # one line a row
        for record in front:
            row = next(line for line in rows if line.split()[0] == str(record.trial))
            assert f"{record.accuracy:.4f}" in row and f"{record.params:,}" in row
