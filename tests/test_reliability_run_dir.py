"""Issue 12, section 2: a refused or interrupted run leaves the run directory as it was;
Ctrl-C stops a study cleanly (exit 130); misbehaving plugins fail only their trial."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

import rankopt
from rankopt.cli import main
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.contract.manager import reset_registry
from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome
from rankopt.core.records import StrategyInfo
from reliability_support import cli_command, sqlite_states, storage_trials, wait_for

FAST = {
    "model": {"name": "small_cnn", "kwargs": {"width": 4}},
    "data": {"name": "digits", "batch_size": 256},
    "reference": {"epochs": 0.2, "lr": 0.05},
    "decomposers": ["tucker2"],
    "selectors": {"energy": {"p": 0.8}},
    "strategies": {"finetune": {"epochs": 0.05, "lr": 0.02}},
    "sampler": {"name": "random", "seed": 0},
    "trials": 1,
}


def folder_hash(root: Path) -> str:
    """SHA-256 over every path under ``root`` with its bytes (files) or kind (others)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            h.update(str(path.relative_to(root)).encode() + b"\0")
            h.update(path.read_bytes() if path.is_file() else b"<dir>")
    return h.hexdigest()


def write_study(path: Path, **changes: Any) -> Path:
    path.write_text(yaml.safe_dump({"name": "first", **FAST, **changes}))
    return path


@pytest.fixture(scope="module")
def done_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished one-trial study in a run directory whose name has ?, % and #."""
    work = tmp_path_factory.mktemp("rundir")
    study = write_study(work / "study.yaml")
    run_dir = work / "r?x%20y#z"
    assert main(["run", str(study), "--run-dir", str(run_dir), "-q"]) == 0
    return study, run_dir


def test_a_run_dir_with_url_characters_keeps_its_database_inside(done_run: tuple[Path, Path]) -> None:
    study, run_dir = done_run
    assert (run_dir / "optuna.db").is_file()
    assert sorted(p.name for p in run_dir.parent.iterdir()) == sorted(["study.yaml", run_dir.name])
    assert [t.state for t in storage_trials(run_dir, "first")] == [TrialState.COMPLETE]


@pytest.mark.parametrize("change, needle", [
    ({"model": {"name": "small_cnn", "kwargs": {"width": 6}}}, "model"),
    ({"seed": 1}, "seed"),
    ({"objectives": ["accuracy", "params"]}, "objectives"),
    ({"name": "second"}, "name"),
])
def test_another_study_in_the_run_dir_is_refused_before_writing(
    done_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    change: dict[str, Any], needle: str,
) -> None:
    _, run_dir = done_run
    before = folder_hash(run_dir)
    other = write_study(tmp_path / "other.yaml", **change)
    assert main(["run", str(other), "--run-dir", str(run_dir), "--trials", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "new --run-dir" in err, err
    assert folder_hash(run_dir) == before


def test_the_run_record_never_overwrites_the_users_study_file(tmp_path: Path) -> None:
    study = write_study(tmp_path / "study.yaml")
    text = study.read_bytes()
    assert main(["run", str(study), "--run-dir", str(tmp_path), "-q"]) == 0
    assert study.read_bytes() == text and (tmp_path / "resolved-study.yaml").is_file()
    # running the record itself is refused (every run rewrites it)
    before = folder_hash(tmp_path)
    assert main(["run", str(tmp_path / "resolved-study.yaml"), "--run-dir", str(tmp_path)]) == 2
    assert folder_hash(tmp_path) == before


def test_empty_run_dir_and_memory_storage_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    study = write_study(tmp_path / "s.yaml")
    for args in (["--run-dir", ""], ["--run-dir", "  "]):
        assert main(["run", str(study), *args]) == 2
        assert "--run-dir" in capsys.readouterr().err
    for url in ("sqlite:///:memory:", "sqlite://", "sqlite:///file:x?mode=memory&uri=true"):
        with pytest.raises(ConfigError, match="in-memory database"):
            load_config({"name": "x", "storage": url}, check_plugins=False)
    with pytest.raises(ConfigError, match="run_dir"):
        load_config({"name": "x", "run_dir": ""}, check_plugins=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


# -- misbehaving plugins --------------------------------------------------------------------------


class _Exit(BaseException):
    """A BaseException that is not an Exception (like gevent's or a framework's own)."""


class Misbehaving(Strategy):
    name = "misbehaving"
    description = "test strategy: exits, interrupts, lies about its spec or gives NaN"
    HOW = ("none", "sys_exit", "keyboard", "base_exception", "wrong_spec", "nan_logits")

    def defaults(self) -> dict[str, Any]:
        return {"how": "none"}

    def search_space(self) -> dict[str, Any]:
        return {}

    def validate_params(self, params: Any) -> dict[str, Any]:
        return {**self.defaults(), **dict(params)}

    def run(self, ctx: TrialContext, params: dict[str, Any]) -> TrialOutcome:
        how = params["how"]
        if how == "sys_exit":
            sys.exit(3)
        if how == "keyboard":
            raise KeyboardInterrupt  # raised by a plugin, not the user's Ctrl-C
        if how == "base_exception":
            raise _Exit("a framework's own BaseException")
        model = ctx.model()
        spec = ctx.select_ranks(model)
        small = ctx.compress(model, spec)
        if how == "wrong_spec":
            assert spec  # the model has this layer factorized; the spec now says it is not
            spec = dict(list(spec.items())[1:])
        if how == "nan_logits":
            with torch.no_grad():
                next(p for n, p in small.named_parameters() if n.endswith("weight")).fill_(float("nan"))
        return TrialOutcome(small, spec)


class _Plugin:
    @hookimpl
    def rankopt_strategies(self) -> list[StrategyInfo]:
        return [StrategyInfo("misbehaving", Misbehaving, Misbehaving.description)]


@pytest.fixture
def misbehaving() -> Iterator[None]:
    rankopt.register_plugin(_Plugin())
    yield
    reset_registry()


def test_misbehaving_plugins_fail_only_their_trial(tmp_path: Path, misbehaving: None) -> None:
    hows = Misbehaving.HOW
    config = {
        "name": "misbehave", **FAST, "run_dir": str(tmp_path / "run"),
        "selectors": {"energy": {"p": 0.6}},
        "strategies": {"misbehaving": {"how": {"choices": list(hows)}}},
        "enqueue": [{"misbehaving.how": h} for h in hows],
        "trials": len(hows),  # started trials are capped at this: exactly the enqueued ones
    }
    result = rankopt.run_study(config)
    states = {t.params["misbehaving.how"]: t for t in result.study.trials}
    assert set(states) == set(hows) and len(result.study.trials) == len(hows)
    reasons = {h: t.user_attrs.get("reason", "") for h, t in states.items()}
    assert states["none"].state == TrialState.COMPLETE
    for how, needle in [("sys_exit", "SystemExit"), ("keyboard", "KeyboardInterrupt"),
                        ("base_exception", "_Exit"), ("wrong_spec", "does not match its spec"),
                        ("nan_logits", "non-finite logits")]:
        assert states[how].state == TrialState.FAIL and needle in reasons[how], (how, reasons[how])
        folder = tmp_path / "run" / "trials" / str(states[how].number)
        assert json.loads((folder / "metrics.json").read_text())["state"] == "FAIL"
        assert not (folder / "model.pt").exists()
    assert [r.trial for r in result.front()] == [states["none"].number]


# -- Ctrl-C and reconciliation -------------------------------------------------------------------


def test_reconcile_makes_folders_agree_with_the_storage(tmp_path: Path) -> None:
    from rankopt.search.rundir import reconcile_trial_dirs

    study = optuna.create_study(directions=["maximize"])
    failed = study.ask()
    failed.set_user_attr("reason", "interrupted")
    study.tell(failed, state=TrialState.FAIL)
    ok = study.ask()
    study.tell(ok, 1.0)
    for number in (0, 1, 7):
        folder = tmp_path / "trials" / str(number)
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"trial": number, "state": "COMPLETE"}))
        (folder / "model.pt").write_bytes(b"x")
    assert reconcile_trial_dirs(study, tmp_path) == [0, 7]
    metrics = json.loads((tmp_path / "trials" / "0" / "metrics.json").read_text())
    assert metrics["state"] == "FAIL" and metrics["reason"] == "interrupted"
    assert not (tmp_path / "trials" / "0" / "model.pt").exists()
    assert not (tmp_path / "trials" / "7").exists()  # no such trial in the storage
    assert (tmp_path / "trials" / "1" / "model.pt").read_bytes() == b"x"  # COMPLETE: untouched
    assert reconcile_trial_dirs(study, tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_marks_the_trial_interrupted_and_a_rerun_continues(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({
        "name": "rely", **FAST, "run_dir": str(run_dir), "trials": 3,
        "strategies": {"slow": {"sleep": 30.0, "epochs": 0.05}},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli_command("run", str(study), "--quiet"), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "trials" / "0").is_dir(), 240, "trial 0 to start", proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = out.decode(errors="replace").strip()
    assert proc.returncode == 130, text
    assert text.splitlines()[-1] == "Interrupted: 0 trials complete; rerun the same command to continue"
    assert "Traceback" not in text
    trials = storage_trials(run_dir)
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["reason"] == "interrupted"
    assert not (run_dir / "trials" / "0").exists()
    assert not (run_dir / "run.lock").exists()
    # the rerun continues (short trials now) and ends with exactly the trials wanted
    study.write_text(study.read_text().replace("sleep: 30.0", "sleep: 0.0"))
    rerun = subprocess.run(cli_command("run", str(study), "--quiet"), cwd=tmp_path, env=env,
                           capture_output=True, timeout=400)
    assert rerun.returncode == 0, rerun.stdout.decode()[-2000:] + rerun.stderr.decode()[-2000:]
    states = sqlite_states(run_dir)
    assert sorted(states.values()).count("COMPLETE") == 3 and states[0] == "FAIL"
