"""Faults contained (issue 26, item 8): a trial that hangs ends at ``trial_timeout``; with
``isolate: process`` a plugin's ``os._exit`` or a segfault fails only its trial; SIGTERM
is handled like Ctrl-C; Ctrl-C in the multi-fidelity rung leaves nothing RUNNING; and
trials found dead at the start count towards ``max_failures``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import faults_support
import rankopt
from rankopt.core.errors import ConfigError
from rankopt.contract.manager import reset_registry
from reliability_support import sqlite_states, storage_trials, tiny_study, wait_for


@pytest.fixture
def crashy() -> Iterator[None]:
    rankopt.register_plugin(faults_support)
    yield
    reset_registry()


def crashy_study(run_dir: Path, acts: list[str], **changes: object) -> dict:
    """A study whose trials are the enqueued ``acts`` in order (a distinct energy.p each:
    Optuna skips an enqueued point equal to an earlier one)."""
    return tiny_study(
        run_dir=str(run_dir),
        strategies={"crashy": {"act": {"choices": list(faults_support.ACTS)}, "epochs": 0.1}},
        enqueue=[{"crashy.act": act, "energy.p": 0.6 + 0.01 * i} for i, act in enumerate(acts)],
        trials=len(acts),
        **changes,
    )


def folder_files(run_dir: Path, number: int) -> list[str]:
    return sorted(p.name for p in (run_dir / "trials" / str(number)).iterdir())


def test_a_hung_trial_ends_at_trial_timeout_and_the_run_goes_on(tmp_path: Path, crashy: None) -> None:
    run_dir = tmp_path / "run"
    result = rankopt.run_study(crashy_study(run_dir, ["none", "hang", "none"], trial_timeout=4))
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    reason = trials[1].user_attrs["reason"]
    assert reason.startswith("timeout: the trial ran longer than trial_timeout (4 s)"), reason
    metrics = json.loads((run_dir / "trials" / "1" / "metrics.json").read_text())
    assert metrics["state"] == "FAIL" and metrics["reason"] == reason
    assert 4 <= metrics["seconds"] < 60  # stopped at the limit, not when the loop ended
    assert folder_files(run_dir, 1) == ["metrics.json"]
    # the completed trials ran in child processes too and wrote loadable models
    for number in (0, 2):
        assert rankopt.load_compressed(run_dir / "trials" / str(number) / "model.pt") is not None
    assert "RUNNING" not in [t.state.name for t in storage_trials(run_dir)]


def test_isolate_process_fails_only_the_trial_that_kills_its_process(tmp_path: Path, crashy: None) -> None:
    run_dir = tmp_path / "run"
    result = rankopt.run_study(crashy_study(run_dir, ["exit", "none", "segv", "none"], isolate="process"))
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert "exited with code 3 without a result" in trials[0].user_attrs["reason"]
    assert "died of SIGSEGV" in trials[2].user_attrs["reason"]
    for number in (0, 2):
        assert folder_files(run_dir, number) == ["metrics.json"]
    assert result.status()["trials"] == {"COMPLETE": 2, "FAIL": 2}


@pytest.mark.parametrize("value", [0, -1, 30 * 24 * 3600 + 1, float("inf"), float("nan"), "soon"])
def test_trial_timeout_out_of_bounds_is_refused_before_any_work(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="trial_timeout"):
        rankopt.Study(crashy_study(tmp_path / "run", ["none"], trial_timeout=value))
    with pytest.raises(ConfigError, match="isolate"):
        rankopt.Study(crashy_study(tmp_path / "run", ["none"], isolate="thread"))
    assert not (tmp_path / "run").exists()


def test_trial_timeout_on_the_ray_backend_is_refused_before_any_work(tmp_path: Path, crashy: None) -> None:
    pytest.importorskip("ray.tune")
    with pytest.raises(ConfigError, match="trial_timeout: 5 s is supported on the local backend only"):
        rankopt.run_study(crashy_study(tmp_path / "run", ["none"], trial_timeout=5, backend="ray"))
    assert not (tmp_path / "run").exists()


def start(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("isolate", ["none", "process"])
def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path, isolate: str) -> None:
    run_dir = tmp_path / "run"
    study = tmp_path / "s.yaml"
    spec = crashy_study(run_dir, ["none", "none"], isolate=isolate)
    spec["strategies"]["crashy"]["sleep"] = 60.0
    study.write_text(yaml.safe_dump(spec))
    proc = start(faults_support.cli_command("run", str(study), "--quiet"), tmp_path)
    try:
        wait_for(lambda: "RUNNING" in sqlite_states(run_dir).values()
                 and (run_dir / "trials" / "0").is_dir(), 240, "trial 0 to start", proc)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        stop(proc)
    text = out.decode(errors="replace").strip()
    assert proc.returncode == 130, text  # as for Ctrl-C
    assert text.splitlines()[-1] == (
        "Interrupted by SIGTERM: 0 trials complete; rerun the same command to continue")
    assert "Traceback" not in text
    trials = storage_trials(run_dir)
    assert [t.state.name for t in trials[:1]] == ["FAIL"]
    assert "RUNNING" not in [t.state.name for t in trials]
    assert trials[0].user_attrs["reason"] == "interrupted"
    assert not (run_dir / "trials" / "0" / "model.pt").exists()
    assert not (run_dir / "run.lock").exists()


@pytest.mark.slow
def test_trials_found_dead_count_towards_max_failures(tmp_path: Path) -> None:
    """Without isolation a plugin's os._exit takes the driver down; each rerun finds one
    more dead trial, and the run that reaches max_failures stops with a message instead
    of running (and dying) again."""
    run_dir = tmp_path / "run"
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(crashy_study(run_dir, ["exit"] * 4, max_failures=2)))
    codes = []
    for _ in range(2):
        proc = start(faults_support.cli_command("run", str(study), "--quiet"), tmp_path)
        try:
            out, _ = proc.communicate(timeout=300)
        finally:
            stop(proc)
        codes.append(proc.returncode)
    assert codes == [3, 3]  # the plugin's own exit code: the driver died with it
    proc = start(faults_support.cli_command("run", str(study), "--quiet"), tmp_path)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        stop(proc)
    text = out.decode(errors="replace").strip()
    assert proc.returncode == 1, text
    assert "2 trial(s) took their process down in a row" in text and "isolate: process" in text
    states = sqlite_states(run_dir)
    assert list(states.values()).count("FAIL") == 2 and "RUNNING" not in states.values()
    # each dead trial is enqueued again with its own parameters (once: the third run stopped
    # before running any), ahead of the sampler's trials
    trials = storage_trials(run_dir)
    for number in (0, 1):
        retry = [t for t in trials if t.user_attrs.get("retry_of") == number]
        assert len(retry) == 1 and retry[0].state.name == "WAITING"
        assert retry[0].system_attrs["fixed_params"] == trials[number].params


def test_ctrl_c_in_the_fidelity_rung_leaves_no_running_trial(
    tmp_path: Path, crashy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rankopt.search import fidelity
    from rankopt.search.objective import INTERRUPTED

    run_dir = tmp_path / "run"
    spec = crashy_study(run_dir, ["none", "none"], multi_fidelity={"rounds": 1, "epochs": 0.1, "keep": 1.0})
    real = fidelity.continue_trial
    calls = []

    def interrupted(env, number, source, fid):  # type: ignore[no-untyped-def]
        calls.append(number)
        (env.trial_dir(number)).mkdir(parents=True, exist_ok=True)
        (env.trial_dir(number) / "model.pt").write_bytes(b"half")
        INTERRUPTED.set()  # as the SIGINT handler does
        raise KeyboardInterrupt

    monkeypatch.setattr(fidelity, "continue_trial", interrupted)
    with pytest.raises(rankopt.core.errors.StudyInterrupted):
        rankopt.run_study(spec)
    # both continuations were claimed before the first ran (issue 28: exact counts): the
    # interrupted one and the one not started yet are both FAIL "interrupted", none RUNNING
    states = [t.state.name for t in storage_trials(run_dir)]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"] and len(calls) == 1
    lost = storage_trials(run_dir)[2:]
    assert all(t.user_attrs["reason"] == "interrupted" for t in lost)
    assert sorted(t.user_attrs["continued_from"] for t in lost) == [0, 1]
    assert not (run_dir / "trials" / "2" / "model.pt").exists()

    # the rerun does the continuation again (it is not requeued as a search trial)
    monkeypatch.setattr(fidelity, "continue_trial", real)
    result = rankopt.run_study(spec)
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert sorted(t.user_attrs.get("continued_from") for t in trials[4:]) == [0, 1]
    assert all(t.user_attrs.get("retry_of") is None for t in trials)


def test_a_spawned_trial_process_gives_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where CUDA is initialised in the driver, the trial's process is spawned (its
    environment pickled to it) instead of forked; forced here on CPU, a built-in strategy's
    trial completes with the same metrics as in the driver."""
    from rankopt.search import watchdog

    spec = tiny_study(trials=1, strategies={"finetune": {"epochs": 0.1, "lr": 0.02}}, seed_proposals=1)
    inline = rankopt.run_study(spec, run_dir=str(tmp_path / "inline")).study.trials[0]
    monkeypatch.setattr(watchdog, "_start_method", lambda: "spawn")
    spawned = rankopt.run_study({**spec, "isolate": "process"}, run_dir=str(tmp_path / "spawned")).study.trials[0]
    assert spawned.state.name == inline.state.name == "COMPLETE"
    assert spawned.params == inline.params
    assert {k: spawned.user_attrs[k] for k in ("accuracy", "params", "flops")} == {
        k: inline.user_attrs[k] for k in ("accuracy", "params", "flops")}


def test_an_interrupt_during_a_storage_step_is_raised_when_the_step_ends() -> None:
    """Ctrl-C or SIGTERM while a trial is asked, named or stored (interrupts deferred)
    waits for the step to finish, so no RUNNING trial is left without its process; in a
    trial's own work it is raised at once."""
    from rankopt.search.objective import INTERRUPT_SIGNAL, interrupt_guard, interrupts

    steps = []
    with interrupt_guard():
        with pytest.raises(KeyboardInterrupt):
            with interrupts(deferred=True):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                steps.append("stored")  # the step went on to its end
        assert steps == ["stored"] and INTERRUPT_SIGNAL == ["SIGTERM"]
        with pytest.raises(KeyboardInterrupt):
            with interrupts(deferred=True):
                with interrupts(deferred=False):  # the trial's work
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                    steps.append("trained")
                steps.append("after")
        assert steps == ["stored"] and INTERRUPT_SIGNAL == ["SIGINT"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
