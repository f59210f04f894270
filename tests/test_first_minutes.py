"""The first ten minutes: the quickstart's test split, tables at 80 columns, a busy
dashboard port, empty runs, hints and short errors with "did you mean"."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import optuna
import pytest
import torch
import yaml

import rankopt
from rankopt.cli import main
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError, ExportError
from rankopt.results.reading import StudyResult, TrialRecord
from study_support import FINETUNE, RANDOM, run_study_file, small_study

ROOT = Path(__file__).resolve().parents[1]
TINY = small_study("tiny", data={"name": "digits", "batch_size": 128, "kwargs": {"test_fraction": 0.15}},
                   decomposers=["tucker2", "svd"], strategies=FINETUNE, sampler=RANDOM, trials=2)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    code, _, out = run_study_file(tmp_path_factory.mktemp("first"), TINY, file_name="tiny.yaml")
    assert code == 0
    return out


def test_the_quickstart_holds_out_a_test_split() -> None:
    from rankopt.results.evaluation import config_splits

    config = load_config(ROOT / "studies" / "quickstart.yaml")
    splits = config_splits(config)
    assert splits.test is not None and len(splits.test) > 100  # type: ignore[arg-type]


def _record(trial: int, accuracy: float, selector: str, spec: dict) -> TrialRecord:
    return TrialRecord(
        trial=trial, accuracy=accuracy, params=6116 + 1000 * trial, flops=270_760 + 100_000 * trial,
        params_compression=10.82, flops_compression=13.28, strategy="finetune", selector=selector,
        hyperparameters={"epochs": 4.0, "lr": 0.05}, searched={"finetune.lr": 0.05, f"{selector}.p": 0.6},
        ranks_summary="3 tucker2 5x10, 7 tucker2 10x10, 12 svd 2 (3/3 layers)", spec=spec,
    )


SPEC = {"3": {"decomposer": "tucker2", "ranks": [5, 10]}, "7": {"decomposer": "tucker2", "ranks": [10, 10]},
        "12": {"decomposer": "svd", "ranks": [2]}}


def _front_at_80(monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> str:
    from rich.console import Console

    import rankopt.cli.front_table as front_table

    narrow = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(front_table, "console", narrow)
    records = [_record(t, 0.56 + 0.08 * t, "fixed" if t % 2 else "energy", SPEC) for t in range(5)]
    front_table.print_front(records, "Pareto front of quickstart (5 points)",
                            test={t: 0.6 + 0.07 * t for t in range(5)}, **kwargs)  # type: ignore[arg-type]
    return narrow.export_text()


def test_the_front_at_80_columns_is_one_line_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _front_at_80(monkeypatch)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    rows = [line for line in lines if line.strip()[:1].isdigit()]
    assert len(rows) == 5 and all(line.rstrip().endswith("3/3") for line in rows), out
    assert "layers" in out and "…" not in out
    # the caption is whole, wrapped at words
    words = " ".join(out.split())
    assert "accuracy: validation (what the search optimized)" in words
    assert "not shown at this width (see --format csv)" in words


def test_the_ranks_at_80_columns_are_compact(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _front_at_80(monkeypatch, ranks=True)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    rows = [line for line in lines if line.strip()[:1].isdigit()]
    assert len(rows) == 5 and all("T5x10 T10x10 S2" in line for line in rows), out
    assert "T = tucker2, S = svd" in " ".join(out.split())


def test_evaluate_split_val_shows_one_val_column(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(tiny_run), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert out.count("val accuracy") == 2  # the title and one column
    assert main(["evaluate", str(tiny_run)]) == 0  # the test split held out by test_fraction
    assert "test accuracy" in capsys.readouterr().out


def test_a_busy_dashboard_port_is_one_line(tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("optuna_dashboard")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["dashboard", str(tiny_run), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port {port}" in err and "free port" in err, err


def test_an_empty_run_gets_one_clear_line(tiny_run: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    record = yaml.safe_load((tiny_run / "resolved-study.yaml").read_text())
    record["run_dir"] = str(empty)
    (empty / "resolved-study.yaml").write_text("# the resolved study config\n" + yaml.safe_dump(record))
    optuna.create_study(storage=f"sqlite:///{empty / 'optuna.db'}", study_name="tiny",
                        directions=["maximize", "minimize", "minimize"])
    assert main(["status", str(empty)]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "no finished trial yet" in out, out
    for args in (["evaluate", str(empty)], ["pick", str(empty), "--trial", "0", "--out", str(tmp_path / "m.pt")],
                 ["pareto", str(empty)], ["report", str(empty)]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no finished trial yet" in err and "--run-dir" in err, err


def test_unknown_names_get_did_you_mean_in_a_short_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({**TINY, "model": {"name": "small_cn"}})
    assert "did you mean 'small_cnn'" in str(info.value) and len(str(info.value)) < 300
    with pytest.raises(ConfigError) as info:
        load_config({**TINY, "trails": 3})
    assert "did you mean 'trials'" in str(info.value) and len(str(info.value)) < 300
    with pytest.raises(ConfigError) as info:
        load_config({**TINY, "strategies": {"finetune": {"epoch": 3}}})
    assert "did you mean 'epochs'" in str(info.value)
    with pytest.raises(rankopt.UnknownNameError, match="did you mean 'tucker2'"):
        rankopt.decomposer("tuker2")


def test_a_continued_trial_reports_the_epochs_it_trained() -> None:
    frozen = optuna.trial.create_trial(
        values=[0.9, 100, 1000], user_attrs={
            "accuracy": 0.9, "params": 100, "flops": 1000, "strategy": "finetune", "selector": "fixed",
            "hyperparameters": {"epochs": 2.0, "lr": 0.05}, "train_epochs": 4.0, "fidelity": 1,
            "continued_from": 3})
    result = object.__new__(StudyResult)
    result.run_dir = Path("run")
    record = result._record(frozen)
    assert record.hyperparameters["epochs"] == 4.0 and record.train_epochs == 4.0


def test_inspect_json_and_csv_never_mark_a_thin_stem_compressed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "small_cnn", "--format", "json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    stem = next(layer for layer in layers if layer["S"] == 1)
    assert all(not m["compressed"] and m["reason"] for m in stem["methods"].values())
    assert any("kept dense" in m["reason"] for m in stem["methods"].values())
    assert main(["inspect", "small_cnn", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = lines[0].split(",")
    stem_line = next(line.split(",") for line in lines[1:] if line.split(",")[2] == "1")
    assert all(stem_line[i] == "False" for i, h in enumerate(head) if h.endswith("_compressed"))


def test_export_checks_a_relative_tolerance() -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    big = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        big[1].weight.mul_(1e4)  # logits ~1e4: float rounding alone passes 1e-4 absolute
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        result = rankopt.export(big, Path(folder) / "m.onnx", input_shape=(1, 1, 8, 8), fold_bn=False)
        assert result.max_rel_diff <= 1e-4 and result.rtol == 1e-4
        assert result.max_rel_diff == pytest.approx(result.max_abs_diff / 1e4, rel=10)
        with pytest.raises(ExportError, match="of the largest output"):
            rankopt.export(big, Path(folder) / "n.onnx", input_shape=(1, 1, 8, 8), fold_bn=False,
                           tolerance=1e-12, rtol=1e-12)


@pytest.fixture(scope="module")
def python_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study run from Python on a module and data passed in (with a test split)."""
    from rankopt.results.evaluation import hold_out_test
    from rankopt.plugins.models.small_cnn import small_cnn

    out = tmp_path_factory.mktemp("python") / "run"
    splits = hold_out_test(rankopt.dataset("digits"), 0.15, 0)
    config = {k: v for k, v in TINY.items() if k not in ("model", "data")}
    rankopt.Study({**config, "name": "frompython", "run_dir": str(out)}, model=small_cnn(width=8),
                  data=splits, progress=False).run()
    return out


def test_hints_for_a_python_run_say_what_to_pass(python_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    picked = tmp_path / "m.pt"
    assert main(["pick", str(python_run), "--trial", "0", "--out", str(picked)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "data came from Python" in out and "no test split" not in out
    assert main(["inspect", str(python_run)]) == 2
    err = capsys.readouterr().err
    assert "inspect_rows" not in err and "rankopt.find_layers(model, input_shape)" in err
    for args in (["export", str(python_run), "--trial", "0", "--out", str(tmp_path / "m.onnx")],
                 ["pick", str(python_run), "--trial", "0", "--out", str(tmp_path / "f.pt"), "--fold-bn"]):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert "rankopt.load_compressed(path, model=SmallCNN(...))" in err and len(err.splitlines()) == 1, err


def test_a_wrong_architecture_names_the_model_passed(tiny_run: Path) -> None:
    from rankopt.core.errors import ArtifactError
    from rankopt.plugins.models.small_cnn import small_cnn

    path = StudyResult(tiny_run).pick(trial=0).model_path
    with pytest.raises(ArtifactError) as info:
        rankopt.load_compressed(path, model=small_cnn(width=16))
    text = str(info.value)
    assert "the model= passed (SmallCNN) is another architecture" in text and "size mismatch" in text
    assert "registered model 'small_cnn'" in text and len(text) < 400


@pytest.mark.parametrize("args", [["plugins"], ["inspect", "small_cnn"]])
def test_other_tables_fit_80_columns_one_line_a_row(args: list[str]) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "rankopt", *args], capture_output=True, text=True,
                         env=env, check=True, timeout=300).stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    if args == ["plugins"]:  # every plugin row starts with its family: no continuation lines
        body = [line for line in lines if line.startswith("│")]
        assert body and all(line.split("│")[1].strip() for line in body), out
    else:  # the long notes are footnotes, not folded rows
        assert "(note 1)" in out and "note 1: 0: kept dense by studies" in " ".join(out.split())
