"""Continuing a run keeps its meaning: a change to what a trial trains or measures is
refused (exit 2, each change named old -> new, nothing written); the trial count, the
backend and the like may change."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from rankopt.cli import main
from rankopt.search.run_meaning import describe_changes, meaning_changes
from study_support import FINETUNE, RANDOM, run_study_file, small_study

STUDY = small_study("meaning", data={"name": "digits", "batch_size": 128}, decomposers=["tucker2", "svd"],
                    strategies=FINETUNE, sampler=RANDOM, seed_proposals=False, trials=1)


def folder_bytes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    code, study, run_dir = run_study_file(tmp_path_factory.mktemp("meaning"), STUDY)
    assert code == 0
    return study, run_dir


@pytest.mark.parametrize("sets, named", [
    (["strategies.finetune.epochs=1"], "strategies.finetune.epochs 0.2 -> 1"),
    (["data.batch_size=64"], "data.batch_size 128 -> 64"),
    (["decomposers=[tucker2]"], "decomposers"),
    (["strategies.finetune.lr={low: 0.01, high: 0.1}"], "strategies.finetune.lr"),
    (["objectives=[accuracy, params]"], "objectives"),
    (["multi_fidelity={rounds: 1, keep: 0.5}"], "multi_fidelity None -> {"),
])
def test_a_changed_meaning_is_refused_and_nothing_changes(
    made: tuple[Path, Path], capsys: pytest.CaptureFixture[str], sets: list[str], named: str
) -> None:
    study, run_dir = made
    before = folder_bytes(run_dir)
    args = [a for s in sets for a in ("--set", s)]
    assert main(["run", str(study), "--run-dir", str(run_dir), "--trials", "2", "-q", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "--run-dir" in err, err
    assert len(err) < 300
    assert folder_bytes(run_dir) == before


def test_the_trial_count_and_where_it_runs_may_change(made: tuple[Path, Path]) -> None:
    study, run_dir = made
    assert main(["run", str(study), "--run-dir", str(run_dir), "--trials", "2", "--backend", "local",
                 "--set", "max_concurrent=1", "-q"]) == 0
    assert len(list((run_dir / "trials").iterdir())) == 2


def test_every_change_is_named() -> None:
    old = {"seed": 0, "strategies": {"finetune": {"epochs": 4}}, "model": {"name": "m", "path": "/a"}}
    new = {"seed": 1, "strategies": {"finetune": {"epochs": 1}}, "model": {"name": "m", "path": "/b"}}
    changes = meaning_changes(old, new)
    assert [c[0] for c in changes] == ["strategies.finetune.epochs", "seed"]  # model.path is where, not what
    assert describe_changes(changes) == "strategies.finetune.epochs 4 -> 1; seed 0 -> 1"
