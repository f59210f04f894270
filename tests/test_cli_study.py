"""The study commands: run, status, pareto, report, pick (and their --help)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

import rankopt
from rankopt.cli import main
from rankopt.results.reading import StudyResult
from study_support import tiny_cli_study


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cli")
    study_file = base / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(tiny_cli_study()))
    out = base / "run"
    assert main(["run", str(study_file), "--run-dir", str(out), "--trials", "4", "--quiet"]) == 0
    return out


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", ["run", "status", "pareto", "report", "pick"])
def test_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert f"rankopt {command}" in out


def test_run_wrote_the_trials_asked_for(run_dir: Path) -> None:
    result = StudyResult(run_dir)
    assert len(result.trials()) == 4  # --trials overrides the file's 2
    assert sorted(p.name for p in (run_dir / "trials").iterdir()) == ["0", "1", "2", "3"]


def test_status_json_and_table(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "status", str(run_dir), "--format", "json")
    assert code == 0
    status = json.loads(out)
    assert status["trials"] == {"COMPLETE": 4}
    ref = json.loads((run_dir / "reference" / "metrics.json").read_text())
    assert status["reference"] == {k: ref[k] for k in ("accuracy", "params", "flops")}
    assert set(status["hypervolume"]) == {"params", "flops"}
    code, out, _ = run_cli(capsys, "status", str(run_dir))
    assert code == 0 and "COMPLETE 4" in out and "hypervolume" in out


def test_pareto_formats_agree(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    front = StudyResult(run_dir).front()
    code, out, _ = run_cli(capsys, "pareto", str(run_dir), "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert [r["trial"] for r in rows] == [r.trial for r in front]
    for row, rec in zip(rows, front):
        assert (row["accuracy"], row["params"], row["flops"]) == (rec.accuracy, rec.params, rec.flops)
        assert {"strategy", "params_compression", "flops_compression", "ranks_summary"} <= set(row)
    code, out, _ = run_cli(capsys, "pareto", str(run_dir), "--format", "csv")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["trial"]) for r in table] == [r.trial for r in front]
    assert [int(r["params"]) for r in table] == [r.params for r in front]
    code, out, _ = run_cli(capsys, "pareto", str(run_dir))
    assert code == 0 and "Pareto front of tiny" in out
    code, _, err = run_cli(capsys, "pareto", str(run_dir), "--format", "xml")
    assert code == 2 and "--format must be one of" in err


def test_report_writes_plots_and_summary(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    front = StudyResult(run_dir).front()
    best = max(front, key=lambda r: r.accuracy)
    code, out, _ = run_cli(capsys, "report", str(run_dir))
    assert code == 0
    report = run_dir / "report"
    for name in ("front_params.png", "front_flops.png", "hypervolume.png", f"ranks_trial{best.trial}.png"):
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    summary = (report / "summary.md").read_text()
    assert "## Pareto front" in summary and f"trial {best.trial}" in summary
    for rec in front:
        assert f"| {rec.trial} |" in summary
    code, _, _ = run_cli(capsys, "report", str(run_dir), "--trial", str(front[0].trial))
    assert code == 0 and (report / f"ranks_trial{front[0].trial}.png").is_file()


def test_pick_by_trial_and_by_limits(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = StudyResult(run_dir)
    trials = result.trials()
    splits = rankopt.dataset("digits")
    loader = rankopt.training.loop.make_loader(splits.val, batch_size=256)

    def picked(*args: str) -> tuple[torch.nn.Module, int]:
        out = tmp_path / "picked.pt"
        code, text, err = run_cli(capsys, "pick", str(run_dir), *args, "--out", str(out))
        assert code == 0, err
        return rankopt.load_compressed(out), int(text.split(":")[0].split()[-1])

    target = trials[1]
    model, number = picked("--trial", str(target.trial))
    assert number == target.trial
    assert rankopt.training.loop.evaluate(model, loader) == pytest.approx(target.accuracy)
    assert rankopt.count(model, (1, 1, 8, 8)).params == target.params

    limit = sorted(r.params for r in trials)[1]
    _, number = picked("--max-params", str(limit))
    expected = max((r for r in trials if r.params <= limit), key=lambda r: (r.accuracy, -r.params))
    assert number == expected.trial

    flops_limit = sorted(r.flops for r in trials)[2]
    _, number = picked("--max-flops", str(flops_limit))
    expected = max((r for r in trials if r.flops <= flops_limit), key=lambda r: (r.accuracy, -r.params))
    assert number == expected.trial

    floor = sorted(r.accuracy for r in trials)[1]
    _, number = picked("--min-accuracy", str(floor))
    expected = min((r for r in trials if r.accuracy >= floor), key=lambda r: (r.params, r.flops))
    assert number == expected.trial


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "say which model to pick"),
        (["--trial", "99"], "trial 99 is not a completed trial"),
        (["--max-params", "1"], "no completed trial meets max params 1"),
        (["--min-accuracy", "95"], "min accuracy must be a fraction in [0, 1]"),
    ],
)
def test_pick_errors_exit_2(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            args: list[str], needle: str) -> None:
    out = tmp_path / "x.pt"
    code, _, err = run_cli(capsys, "pick", str(run_dir), *args, "--out", str(out))
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_commands_on_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("status", "pareto", "report"):
        code, _, err = run_cli(capsys, command, str(tmp_path))
        assert code == 2 and "is not a rankopt run directory" in err


def test_pareto_at_80_columns_keeps_the_figures_whole(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import subprocess
    import sys

    front = StudyResult(run_dir).front()
    code, wide, _ = run_cli(capsys, "pareto", str(run_dir))
    assert code == 0 and "energy.p" in wide  # the searched values, at the tests' 240 columns
    env = {**os.environ, "COLUMNS": "80"}
    out = subprocess.run([sys.executable, "-m", "rankopt", "pareto", str(run_dir)], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    for record in front:  # every figure whole, never "0.9…"
        assert f"{record.accuracy:.4f}" in out and f"{record.params:,}" in out and f"{record.flops:,}" in out
    assert "…" not in out and "energy.p" not in out
    assert "searched values not shown at this width (see --format csv)" in " ".join(out.split())


def test_pareto_at_80_columns_moves_a_one_valued_fidelity_to_the_caption(monkeypatch: pytest.MonkeyPatch) -> None:
    # multi-fidelity (the default) adds fidelity and epochs columns; on a front of
    # continued models both hold one value, which fits in the caption
    from rich.console import Console

    import rankopt.cli.front_table as front_table

    narrow = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(front_table, "console", narrow)
    heads = ["trial", "accuracy", "params", "FLOPs", "params x", "FLOPs x", "strategy", "selector",
             "fidelity", "epochs", "energy.p", "layers"]
    body = [[str(t), "0.9806", "15,186", "741,360", "4.36", "4.85", "finetune", "fixed", "1", "4", "0.7",
             "3/3 layers"] for t in range(25, 32)]
    narrow.print(front_table.fitted_table("front", "accuracy: validation", heads, body, ["energy.p"]))
    out = narrow.export_text()
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "0.9806" in out and "741,360" in out and "…" not in out
    assert "fidelity: 1" in out and "epochs: 4" in out
