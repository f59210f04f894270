"""Issue 26, item 5: trial files are bound to their trial. ``trials/N/model.pt`` names its
study and trial and holds its spec; ``pick``, ``evaluate`` and ``export`` check all three
against the storage and load the model before reporting success; ``evaluation.json``
is keyed by the file's SHA-256, so a replaced file is never answered from the cache."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from rankopt.deploy.artifacts import _checksum
from rankopt.cli import main
from rankopt.results.reading import StudyResult
from study_support import digits_study, run_study_file

TINY = digits_study("bound", data={"name": "digits", "batch_size": 128, "test_fraction": 0.2},
                    sampler={"name": "random", "seed": 3}, trials=3)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    code, _, out = run_study_file(tmp_path_factory.mktemp("bound"), TINY, file_name="bound.yaml")
    assert code == 0
    return out


@pytest.fixture
def run_dir(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pristine, copy)
    return copy


def two_trials(run_dir: Path) -> tuple[int, int]:
    """Two completed trials with different specs (so the swap is a different model)."""
    records = StudyResult(run_dir).trials()
    for a in records:
        for b in records:
            if a.trial != b.trial and a.spec != b.spec:
                return a.trial, b.trial
    pytest.skip("the tiny study gave no two different models")


def swap(run_dir: Path, victim: int, source: int) -> None:
    shutil.copyfile(run_dir / "trials" / str(source) / "model.pt", run_dir / "trials" / str(victim) / "model.pt")


def rewrite(run_dir: Path, victim: int, change: Callable[[dict[str, Any]], None], source: int | None = None) -> Path:
    """Trial ``victim``'s model file replaced by ``source``'s (default: its own) payload
    after ``change``, with a recomputed checksum: only the binding can tell."""
    path = run_dir / "trials" / str(victim) / "model.pt"
    payload = torch.load(run_dir / "trials" / str(victim if source is None else source) / "model.pt", weights_only=True)
    change(payload)
    payload["sha256"] = _checksum(payload)
    torch.save(payload, path)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def test_a_swapped_trial_file_is_refused_by_pick_evaluate_and_export(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim, source = two_trials(run_dir)
    # before the swap all three answer
    assert run_cli(capsys, "pick", str(run_dir), "--trial", str(victim), "--out", str(tmp_path / "ok.pt"))[0] == 0
    swap(run_dir, victim, source)
    needle = f"is not trial {victim} of study 'bound': it was written by trial {source}"
    out = tmp_path / "picked.pt"
    code, text = run_cli(capsys, "pick", str(run_dir), "--trial", str(victim), "--out", str(out))
    assert code == 1 and needle in text and not out.exists()
    code, text = run_cli(capsys, "evaluate", str(run_dir), "--trial", str(victim))
    assert code == 1 and needle in text
    code, text = run_cli(capsys, "export", str(run_dir), "--trial", str(victim), "--out", str(tmp_path / "m.onnx"))
    assert code == 1 and needle in text and not (tmp_path / "m.onnx").exists()
    with pytest.raises(Exception, match=needle):
        StudyResult(run_dir).load_model(victim)


def test_a_file_from_another_study_or_with_another_spec_is_refused(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim, source = two_trials(run_dir)
    rewrite(run_dir, victim, lambda payload: payload["metadata"].update(study="other"))
    code, text = run_cli(capsys, "pick", str(run_dir), "--trial", str(victim), "--out", str(tmp_path / "x.pt"))
    assert code == 1 and "of study 'other'" in text

    # the right study and trial, but the spec (and weights) of another trial
    rewrite(run_dir, victim, lambda payload: payload["metadata"].update(trial=victim), source=source)
    code, text = run_cli(capsys, "pick", str(run_dir), "--trial", str(victim), "--out", str(tmp_path / "x.pt"))
    assert code == 1 and "holds another compression than trial" in text
    assert not (tmp_path / "x.pt").exists()


def test_pick_refuses_a_file_that_does_not_load(run_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    victim, _ = two_trials(run_dir)
    # checksum recomputed: only loading shows it is wrong
    rewrite(run_dir, victim, lambda payload: payload["base"]["kwargs"].update(width=9))
    code, text = run_cli(capsys, "pick", str(run_dir), "--trial", str(victim), "--out", str(tmp_path / "x.pt"))
    assert code == 1 and "does not match its spec" in text and not (tmp_path / "x.pt").exists()


def test_the_evaluation_cache_is_keyed_by_the_file(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    victim, source = two_trials(run_dir)
    code, text = run_cli(capsys, "evaluate", str(run_dir), "--trial", str(victim), "--format", "json")
    assert code == 0
    cache = json.loads((run_dir / "evaluation.json").read_text())
    entry = cache["files"]["test"][str(victim)]
    assert entry["path"] == f"trials/{victim}/model.pt"
    # the same file: answered from the cache, without loading it
    assert run_cli(capsys, "evaluate", str(run_dir), "--trial", str(victim))[0] == 0

    (run_dir / "trials" / str(victim) / "model.pt").write_bytes(b"")  # replaced by an empty file
    code, text = run_cli(capsys, "evaluate", str(run_dir), "--trial", str(victim))
    assert code == 1 and "cannot be read safely" in text
    swap(run_dir, victim, source)
    code, text = run_cli(capsys, "evaluate", str(run_dir), "--trial", str(victim))
    assert code == 1 and f"is not trial {victim}" in text
    # a cache written without digests (an older rankopt) is not trusted either
    cache["files"] = {}
    (run_dir / "evaluation.json").write_text(json.dumps(cache))
    code, text = run_cli(capsys, "evaluate", str(run_dir), "--trial", str(victim))
    assert code == 1 and f"is not trial {victim}" in text


def test_an_older_trial_file_without_binding_needs_allow_unchecked(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim, _ = two_trials(run_dir)

    def unbind(payload: dict[str, Any]) -> None:
        del payload["metadata"]["study"], payload["metadata"]["trial"]

    rewrite(run_dir, victim, unbind)
    code, text = run_cli(capsys, "pick", str(run_dir), "--trial", str(victim), "--out", str(tmp_path / "x.pt"))
    assert code == 1 and "does not say which study and trial wrote it" in text and "--allow-unchecked" in text
    with pytest.warns(UserWarning, match="unchecked"):
        code, text = run_cli(capsys, "pick", str(run_dir), "--trial", str(victim), "--out",
                             str(tmp_path / "x.pt"), "--allow-unchecked")
    assert code == 0 and (tmp_path / "x.pt").is_file()
