"""Resume that reproduces (issue 26, item 7): a study interrupted by SIGINT, SIGTERM or
SIGKILL and run again ends with the same front, and the same model for every searched
point and continuation, as the same study run without interruption, on one core, with
and without multi-fidelity.

What makes it so: the interrupted (or dead) trial is enqueued again with its own
parameters, the training seed follows what a trial trains and its rung (not its trial
number, which the rerun changes), and an interrupted continuation is done again by the
promotion step. Every run is a real process (``rankopt run`` with the test plugins) on
one thread; the study's points are its seed proposals, so the sampler adds none.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import faults_support
from rankopt import StudyResult
from reliability_support import sqlite_states, storage_trials, tiny_study, wait_for

pytestmark = pytest.mark.slow  # eight short studies in real processes (minutes on 2 busy cores)

TRIALS = 4
BASELINES: dict[bool, dict[str, Any]] = {}
STARTED: dict[bool, tuple[Path, subprocess.Popen[bytes]]] = {}  # baselines still running


def study_file(folder: Path, mf: bool) -> Path:
    spec = tiny_study(
        run_dir=str(folder / "run"), trials=TRIALS,
        # a second per trial before it trains: long enough to be interrupted in
        strategies={"slow": {"sleep": 1.0, "epochs": 0.1}},
        multi_fidelity={"rounds": 1, "epochs": 0.2, "keep": 0.5} if mf else None,
    )
    path = folder / "study.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    return path


def start(study: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", faults_support.CONTINUATION_SLEEP: "1.5"}
    return subprocess.Popen(faults_support.cli_command("run", str(study), "--quiet"), cwd=study.parent,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen[bytes], timeout: float = 400) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode, out.decode(errors="replace")


def outcome(run_dir: Path) -> dict[str, Any]:
    """The front, and every completed model by (parameters, fidelity)."""
    models = {}
    for t in storage_trials(run_dir):
        if t.state.name == "COMPLETE":
            key = (json.dumps(t.params, sort_keys=True), int(t.user_attrs.get("fidelity", 0)))
            models[key] = (t.user_attrs["accuracy"], t.user_attrs["params"], t.user_attrs["flops"])
    front = sorted((r.accuracy, r.params, r.flops, r.fidelity) for r in StudyResult(run_dir).front())
    return {"front": front, "models": models}


def baseline(tmp_path_factory: pytest.TempPathFactory, mf: bool) -> dict[str, Any]:
    """The uninterrupted study's outcome. Both baselines start at the first call, side by
    side (one thread each: 2 cores), so the second is ready when its case comes."""
    for each in (False, True):
        if each not in BASELINES and each not in STARTED:
            study = study_file(tmp_path_factory.mktemp("uninterrupted"), each)
            STARTED[each] = (study, start(study))
    if mf not in BASELINES:
        study, proc = STARTED.pop(mf)
        code, out = finish(proc)
        assert code == 0, out[-3000:]
        run_dir = study.parent / "run"
        trials = storage_trials(run_dir)
        # the premise: every searched point was enqueued (the sampler proposed none)
        assert all("fixed_params" in t.system_attrs for t in trials if t.user_attrs.get("continued_from") is None)
        BASELINES[mf] = outcome(run_dir)
        assert len(BASELINES[mf]["models"]) == TRIALS + (TRIALS // 2 if mf else 0)
    return BASELINES[mf]


@pytest.fixture(scope="module", autouse=True)
def _no_baseline_left_running() -> Any:
    yield
    for _, proc in STARTED.values():  # a baseline no selected case waited for (pytest -k)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    STARTED.clear()


def in_search(run_dir: Path) -> bool:
    """A trial of the search is running (its folder made), after one completed."""
    states = sqlite_states(run_dir)
    running = [n for n, s in states.items() if s == "RUNNING" and n < TRIALS]
    return list(states.values()).count("COMPLETE") >= 1 and any(
        (run_dir / "trials" / str(n)).is_dir() for n in running)


def in_rung(run_dir: Path) -> bool:
    """A multi-fidelity continuation is running (trials past the search's are continuations)."""
    return any(s == "RUNNING" and n >= TRIALS for n, s in sqlite_states(run_dir).items())


# one case per distinct path: the driver marks the trial (SIGINT, in the search, without
# multi-fidelity), the rerun finds it dead (SIGKILL, in the search; multi-fidelity on, so
# the rung after the retry is checked too), a continuation is done again by the promotion
# step (SIGTERM, in the rung). SIGKILL in the search without multi-fidelity takes the
# dead-trial path of sigkill-mf and was dropped (suite time).
@pytest.mark.parametrize(("sig", "mf", "where"), [
    (signal.SIGINT, False, in_search),
    (signal.SIGTERM, True, in_rung),
    (signal.SIGKILL, True, in_search),
], ids=["sigint", "sigterm-rung", "sigkill-mf"])
def test_front_after_interrupt_and_resume_equals_the_uninterrupted_front(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, sig: signal.Signals, mf: bool, where: Any
) -> None:
    expected = baseline(tmp_path_factory, mf)
    study = study_file(tmp_path, mf)
    run_dir = tmp_path / "run"
    proc = start(study)
    try:
        wait_for(lambda: where(run_dir), 300, f"the moment to send {sig.name}", proc)
        proc.send_signal(sig)
    finally:
        code, out = finish(proc, timeout=120)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), out[-3000:]
    lost = [n for n, s in sqlite_states(run_dir).items() if s != "COMPLETE"]
    assert lost, "the signal landed after the study ended"
    if sig != signal.SIGKILL:  # the driver itself marked it; SIGKILL leaves it to the rerun
        assert "RUNNING" not in sqlite_states(run_dir).values()

    code, out = finish(start(study))
    assert code == 0, out[-3000:]
    trials = storage_trials(run_dir)
    assert "RUNNING" not in [t.state.name for t in trials]
    lost = [t for t in trials if t.state.name == "FAIL"]
    retries = [t for t in trials if t.user_attrs.get("retry_of") is not None]
    if where is in_rung:  # continuations are done again by the promotion step, not requeued
        # (the rung claims its continuations up front: the interrupted one and any not
        # started yet are FAIL "interrupted")
        assert lost and all(t.user_attrs["continued_from"] is not None for t in lost) and not retries
        assert all(t.user_attrs["reason"] == "interrupted" for t in lost)
    else:
        assert len(lost) == 1  # the lost search trial ran again with its own parameters
        assert [t.user_attrs["retry_of"] for t in retries] == [lost[0].number]
        assert retries[0].params == lost[0].params and retries[0].state.name == "COMPLETE"
    assert outcome(run_dir) == expected
