"""A user's day (issue 17): held-out test accuracy, a module passed from Python end to end,
and readable pareto/report output."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn as nn
import yaml
from PIL import Image

import rankopt
from rankopt import DatasetSplits
from rankopt.cli import main
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError
from rankopt.results.evaluation import config_splits
from rankopt.results.reading import StudyResult
from rankopt.study import Study
from rankopt.training.loop import evaluate, make_loader
from study_support import blobs, run_study_file, tiny_cli_study

TINY = tiny_cli_study(data={"name": "digits", "batch_size": 128, "test_fraction": 0.2}, trials=4)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    code, _, out = run_study_file(tmp_path_factory.mktemp("day"), TINY, file_name="tiny.yaml")
    assert code == 0
    return out


def test_data_test_fraction_holds_out_training_data(run_dir: Path) -> None:
    result = StudyResult(run_dir)
    splits = config_splits(result.config)
    plain = rankopt.get_registry().create("datasets", "digits")
    assert splits.test is not None
    assert len(splits.train) + len(splits.test) == len(plain.train)  # type: ignore[arg-type]
    assert len(splits.test) == round(0.2 * len(plain.train))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data.test_fraction"):
        load_config({**TINY, "data": {"name": "digits", "test_fraction": 1.5}})


def test_evaluate_measures_saved_models_on_the_test_split(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = StudyResult(run_dir)
    front = [r.trial for r in result.front()]
    code, out, _ = run_cli(capsys, "evaluate", str(run_dir), "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert [r["trial"] for r in rows] == front
    # the same numbers as evaluating each saved model on the held-out images by hand
    test = config_splits(result.config).test
    loader = make_loader(test, batch_size=64)
    for row in rows:
        expected = evaluate(result.load_model(row["trial"]), loader)
        assert row["test_accuracy"] == pytest.approx(expected, abs=1e-12)
    cached = json.loads((run_dir / "evaluation.json").read_text())["test"]
    assert {int(k) for k in cached} == set(front)
    code, out, _ = run_cli(capsys, "evaluate", str(run_dir), "--trial", str(front[0]), "--split", "val")
    assert code == 0 and "val accuracy" in out
    code, _, err = run_cli(capsys, "evaluate", str(run_dir), "--split", "train")
    assert code == 2 and "--split" in err and "'train'" in err


def test_pick_prints_and_stores_test_accuracy(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "evaluation.json").unlink(missing_ok=True)
    best = max(StudyResult(run_dir).front(), key=lambda r: r.accuracy)
    code, out, _ = run_cli(capsys, "pick", str(run_dir), "--trial", str(best.trial), "--out", str(tmp_path / "m.pt"))
    assert code == 0
    stored = json.loads((run_dir / "evaluation.json").read_text())["test"][str(best.trial)]
    assert f"test accuracy {stored:.4f}" in out


def test_report_adds_test_accuracies_and_labels_front_points(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "report", str(run_dir))
    assert code == 0
    result = StudyResult(run_dir)
    front = result.front()
    summary = (run_dir / "report" / "summary.md").read_text()
    assert "test_accuracy" in summary and "validation accuracy" in summary
    tests = result.evaluate()
    for r in front:
        assert f"| {r.trial} | {r.accuracy:.4f} | {tests[r.trial]:.4f} |" in summary
    # each 2-D plot labels the table's front points with their trial numbers
    for name in ("front_params.png", "front_flops.png"):
        info = Image.open(run_dir / "report" / name).info
        assert info["Description"] == "front trials " + " ".join(str(r.trial) for r in front)
    # three objectives: no unreadable 3-D plot
    assert not (run_dir / "report" / "pareto_front_optuna.png").exists()


def test_front_plot_artists(run_dir: Path) -> None:
    from rankopt.results import report

    result = StudyResult(run_dir)
    plt = report._pyplot()
    captured = []
    close = plt.close
    plt.close = lambda fig: captured.append(fig)  # keep the figure to inspect its artists
    try:
        front = result.front()
        report._front_plot(plt, result, result.trials(), front, {front[0].trial: 0.5},
                           "params", "parameters", run_dir / "probe.png")
    finally:
        plt.close = close
    ax = captured[0].axes[0]
    labels = sorted(int(n) for t in ax.texts for n in t.get_text().split(","))
    assert labels == sorted(r.trial for r in front)
    assert "front, test accuracy" in [t.get_text() for t in ax.get_legend().get_texts()]
    ticks = [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    assert ticks == []  # no crowded minor labels on the log axis
    close(captured[0])


def test_pareto_compact_by_default_ranks_on_request(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    front = StudyResult(run_dir).front()
    code, out, _ = run_cli(capsys, "pareto", str(run_dir))
    assert code == 0
    assert "layers" in out and front[0].ranks_summary not in out
    assert all(len(line) <= 240 for line in out.splitlines())
    # piped: one line per row (title, borders, header, rows, caption)
    assert len(out.splitlines()) == len(front) + 6
    assert "test acc" in out and "held-out test split" in out
    code, out, _ = run_cli(capsys, "pareto", str(run_dir), "--ranks")
    assert front[0].ranks_summary in out


def test_searched_values_are_columns(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import csv
    import io

    front = StudyResult(run_dir).front()
    code, out, _ = run_cli(capsys, "pareto", str(run_dir), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    for rec, row in zip(front, rows):
        assert rec.searched  # the selector's searched value
        for key, value in rec.searched.items():
            assert float(row[key]) == pytest.approx(value)
        # only the chosen selector's values: the other selector's samples are not columns
        other = "energy.p" if rec.selector == "fixed" else "fixed.fraction"
        assert row.get(other, "") == ""


def test_no_test_split_says_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = {"name": "digits", "batch_size": 128}
    cfg = {**TINY, "data": data, "trials": 1, "run_dir": str(tmp_path / "run"),
           "strategies": {"finetune": {"epochs": 0}}}
    rankopt.run_study(cfg)
    code, out, _ = run_cli(capsys, "pick", str(tmp_path / "run"), "--trial", "0", "--out", str(tmp_path / "m.pt"))
    assert code == 0 and "validation number" in out and "data.test_fraction" in out
    code, _, err = run_cli(capsys, "evaluate", str(tmp_path / "run"), "--trial", "0")
    assert code == 2 and "no test split" in err


# -- a module and data passed from Python -------------------------------------------------------


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(16 * 36, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def user_study(run_dir: Path) -> dict:
    return {"name": "mine", "reference": {"epochs": 1, "lr": 0.05}, "decomposers": ["svd"],
            "selectors": {"fixed": {"fraction": {"low": 0.2, "high": 0.9}}},
            "strategies": {"finetune": {"epochs": 0}}, "sampler": {"name": "random", "seed": 0},
            "trials": 2, "run_dir": str(run_dir)}


def test_own_model_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    splits = DatasetSplits(train=blobs(128, 0), val=blobs(64, 1), num_classes=2,
                           input_shape=(1, 6, 6), test=blobs(64, 2))
    run = tmp_path / "run"
    result = Study(user_study(run), model=UserNet(), data=splits).run()
    # report, pareto and status need nothing but the run directory
    for args in (["report", str(run)], ["pareto", str(run)], ["status", str(run)]):
        code, _, err = run_cli(capsys, *args)
        assert code == 0, err
    assert (run / "report" / "summary.md").is_file()
    # the run directory says which architecture to pass, and so does the error
    assert "UserNet" in json.loads((run / "reference" / "metrics.json").read_text())["base"]["class"]
    trial = result.front()[0].trial
    with pytest.raises(rankopt.ArtifactError, match="UserNet.*model="):
        result.load_model(trial)
    model = result.load_model(trial, model=UserNet())
    assert rankopt.count(model, (1, 1, 6, 6)).params == result.front()[0].params
    accuracy = result.evaluate(trial, data=splits, model=UserNet())[trial]
    assert accuracy == evaluate(model, make_loader(splits.test, batch_size=64))
    code, out, _ = run_cli(capsys, "pick", str(run), "--trial", str(trial), "--out", str(tmp_path / "m.pt"))
    assert code == 0 and "UserNet" in out and "model=" in out


def test_wrong_input_shape_names_input_shape(tmp_path: Path) -> None:
    splits = DatasetSplits(train=blobs(32, 0), val=blobs(16, 1), num_classes=2, input_shape=(3, 6, 6))
    with pytest.raises(ConfigError, match=r"input_shape.*\[1, 6, 6\]"):
        Study(user_study(tmp_path / "run"), model=UserNet(), data=splits).run()
    assert not (tmp_path / "run").exists()


# -- small ones ---------------------------------------------------------------------------------


def test_version_and_flag_help(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"rankopt {version('rankopt')}"
    code, out, _ = run_cli(capsys, "run", "--help")
    quiet = next(line for line in out.splitlines() if "--quiet" in line)
    assert "<bool>" not in quiet and "No progress display" in quiet
    backend = next(line for line in out.splitlines() if "--backend" in line)
    assert "study file" in out[out.index(backend):][:200]


def test_misspelt_sampler_lists_the_valid_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({**TINY, "sampler": {"name": "nsga2"}}))
    code, _, err = run_cli(capsys, "run", str(study), "--run-dir", str(tmp_path / "r"))
    assert code == 2 and "'nsga2'" in err and all(n in err for n in ("nsgaii", "tpe", "random"))
    assert not (tmp_path / "r").exists()


def test_status_hides_leftover_waiting_and_shows_running(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = StudyResult(run_dir)
    result.study.enqueue_trial({"selector": "fixed"})  # a queued point the finished run never needed
    running = result.study.ask({})  # a trial in flight, as another worker would hold it
    running_number = running.number
    try:
        status = result.status()
        assert "WAITING" not in status["trials"]
        assert [r["trial"] for r in status["running"]] == [running_number]
        code, out, _ = run_cli(capsys, "status", str(run_dir))
        assert code == 0 and f"running {running_number}" in out and "WAITING" not in out
    finally:
        result.study.tell(running, state=optuna.trial.TrialState.FAIL)


def test_uncompressed_trials_stay_off_the_front(run_dir: Path) -> None:
    from rankopt.results.reading import TrialRecord, compressed

    def rec(spec: dict, ratio: float) -> TrialRecord:
        return TrialRecord(trial=0, accuracy=0.9, params=10, flops=10, params_compression=ratio,
                           flops_compression=ratio, strategy="finetune", selector="fixed", spec=spec)

    assert not compressed(rec({}, 1.0))
    assert not compressed(rec({"a": {"decomposer": "svd", "ranks": [9]}}, 1.0))
    assert compressed(rec({"a": {"decomposer": "svd", "ranks": [4]}}, 1.3))
    result = StudyResult(run_dir)
    assert all(compressed(r) for r in result.front())
    # --min-accuracy 0 asks for the smallest model: never the uncompressed one
    assert compressed(result.pick(min_accuracy=0.0))


def test_weak_reference_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = {**TINY, "trials": 1, "reference": {"epochs": 0}, "run_dir": str(tmp_path / "run"),
           "strategies": {"finetune": {"epochs": 0}}, "data": {"name": "digits"}}
    with caplog.at_level("WARNING", logger="rankopt.study"):
        result = rankopt.run_study(cfg)
    assert result.reference["accuracy"] < 0.2
    assert any("reference model is weak" in r.getMessage() for r in caplog.records)


def test_plugins_compact_by_default_and_by_family(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    assert "--family models" in out and "resnet56_cifar" not in out
    assert len(out.splitlines()) < 60
    code, out, _ = run_cli(capsys, "plugins", "--family", "models")
    assert code == 0 and "resnet56_cifar" in out and "tucker2" not in out


def test_inspect_warns_on_untrained_weights_and_reads_a_run(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "inspect", "small_cnn", "--input-shape", "1,1,8,8")
    assert code == 0 and "untrained (randomly initialized) weights" in err
    code, out, err = run_cli(capsys, "inspect", "small_cnn", "--input-shape", "1,1,8,8", "--format", "json")
    assert code == 0 and json.loads(out)["trained"] is False
    code, out, err = run_cli(capsys, "inspect", str(run_dir))
    assert code == 0 and "untrained" not in err and "reference of" in out
    code, out, err = run_cli(capsys, "inspect", str(run_dir), "--format", "json")
    table = json.loads(out)
    assert table["trained"] is True and table["input_shape"] == [1, 1, 8, 8]
    # the reference weights, not a fresh initialization: the spectrum (and so ranks) follow them
    from rankopt.results.layer_table import load_run_reference

    model, _, _ = load_run_reference(run_dir)
    saved = torch.load(run_dir / "reference" / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_data_paths_are_relative_to_the_study_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(data / "train.npz", x=rng.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8),
             y=np.arange(40) % 2)
    studies = tmp_path / "project" / "studies"
    studies.mkdir()
    study = studies / "s.yaml"
    study.write_text(yaml.safe_dump({**TINY, "data": {"name": "npz", "kwargs": {
        "root": "../data", "train": "train.npz", "val_fraction": 0.25}}}))
    monkeypatch.chdir(tmp_path)  # neither the project nor studies/
    config = load_config(study)
    assert config.data.kwargs["root"] == str(data.resolve())
    assert config.data.kwargs["train"] == "train.npz"  # still relative to root, as npz reads it
    study.write_text(yaml.safe_dump({**TINY, "data": {"name": "npz", "kwargs": {"root": "../nowhere", "train": "t.npz"}}}))
    with pytest.raises(ConfigError) as info:
        load_config(study)
    assert "download" not in str(info.value)  # npz takes no download


def test_set_overrides_any_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(TINY))
    code, _, err = run_cli(capsys, "run", str(study), "--run-dir", str(tmp_path / "r"), "--quiet",
                           "--set", "trials=1", "--set", "strategies.finetune.epochs=0",
                           "--set", "sampler.seed=7")
    assert code == 0, err
    saved = yaml.safe_load((tmp_path / "r" / "resolved-study.yaml").read_text())
    assert saved["trials"] == 1 and saved["sampler"]["seed"] == 7
    assert saved["strategies"]["finetune"] == {"epochs": 0, "lr": 0.02}
    code, _, err = run_cli(capsys, "run", str(study), "--set", "trials")
    assert code == 2 and "--set must be key=value" in err


def test_readme_and_study_file_agree_on_the_quickstart_time() -> None:
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    studies_page = (root / "docs" / "studies.md").read_text()  # the measurement behind the README's claim
    study = (root / "studies" / "quickstart.yaml").read_text()
    figure = re.search(r"(\d+) s of CPU time", study)
    assert figure is not None and f"{figure.group(1)} s of CPU time" in studies_page
    assert "about two minutes" in study and "about two minutes" in readme and "about two minutes" in studies_page


def test_reference_epochs_and_trial_bar_report_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {**TINY, "trials": 1, "reference": {"epochs": 2, "lr": 0.05},
           "strategies": {"finetune": {"epochs": 0}}, "data": {"name": "digits"}}
    rankopt.run_study({**cfg, "run_dir": str(tmp_path / "shown")}, progress=True)
    err = capsys.readouterr().err
    for epoch in (1, 2):
        assert re.search(rf"reference epoch {epoch}/2: loss \d\.\d{{4}}, val accuracy \d\.\d{{4}}, \d+ s, eta \d+ s", err), err
    # a resumed run counts the earlier trial on its bar (2/2 after one more)
    rankopt.run_study({**cfg, "run_dir": str(tmp_path / "shown"), "trials": 2}, progress=True)
    err = capsys.readouterr().err
    assert "2/2" in err and "eta" in err and "front" in err
    # reporting changes nothing: the same reference weights as a run without it
    rankopt.run_study({**cfg, "run_dir": str(tmp_path / "quiet")}, progress=False)
    shown = torch.load(tmp_path / "shown" / "reference" / "model.pt", weights_only=True)
    quiet = torch.load(tmp_path / "quiet" / "reference" / "model.pt", weights_only=True)
    assert all(torch.equal(shown[k], quiet[k]) for k in shown)


def test_plugins_check_shows_progress_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from rich.console import Console

    cli_app = sys.modules["rankopt.cli.app"]  # the module (rankopt.cli.app is the Typer app)
    screen = io.StringIO()
    monkeypatch.setattr(cli_app, "err_console", Console(file=screen, force_terminal=True, width=100))
    assert main(["plugins", "--check", "--family", "rank_selectors"]) == 0
    assert "checking " in screen.getvalue()  # a progress line per plugin
    capsys.readouterr()
