"""Reliability figures (issue 7): malformed inputs tried, trial faults injected and survived,
SIGKILLs survived, concurrent workers, and trials lost, each counted by running the scenario.

    .venv/bin/python benchmarks/bench_reliability.py [--kills 3] [--random-configs 500] [--no-ray]

The scenarios are those of ``tests/test_reliability_*.py`` (imported from there), run
more times: every malformed study file and CLI call of the catalogue plus random configs;
a study whose trials fail in every way the fault plugins know; a study killed with
SIGKILL several times and resumed (local backend, then once on Ray); two workers on one
study (SQLite, and PostgreSQL when ``RANKOPT_TEST_POSTGRES_URL`` names a server).
Appends the table to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
import yaml  # noqa: E402

import rankopt  # noqa: E402
import reliability_support as support  # noqa: E402
from rankopt.cli import main  # noqa: E402
from rankopt.config import load_config  # noqa: E402
from rankopt.errors import ConfigError  # noqa: E402


def malformed_inputs() -> tuple[int, int, list[str]]:
    """The catalogue through the CLI: (tried, clean, failures)."""
    from test_reliability_bad_input import CATALOGUE

    clean, bad = 0, []
    for case, build, needles in CATALOGUE:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            (work / "other-run").mkdir()
            (work / "other-run" / "resolved-study.yaml").write_text("name: other\n")
            cwd = os.getcwd()
            os.chdir(work)
            try:
                args = build(work)
                before = support.tree_snapshot(work)
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    code = main(args)
                after = support.tree_snapshot(work)
            finally:
                os.chdir(cwd)
            message = err.getvalue().strip()
            ok = (code == 2 and len(message.splitlines()) == 1 and "Traceback" not in message
                  and all(n in message for n in needles) and before == after)
            clean += ok
            if not ok:
                bad.append(case)
    return len(CATALOGUE), clean, bad


def random_configs(n: int, seed: int = 0) -> tuple[int, int, int]:
    """Random values at the schema: (tried, valid configs, clean ConfigErrors); a crash raises."""
    rng = random.Random(seed)
    leaves: list[Any] = [None, True, 0, -1, 1, 2**40, 0.5, -0.5, 1.5, float("nan"), float("inf"),
                         "", "x", "../x", "tucker2", "energy", "finetune", "1e-3", [], {}, [1, "a"],
                         {"low": 1, "high": 0}, {"choices": []}, {"p": 2}, {"lr": -1}]
    fields = ["name", "trials", "timeout", "seed", "device", "backend", "decomposers", "selectors",
              "strategies", "objectives", "constraints", "sampler", "reference", "data", "model",
              "targets", "max_concurrent", "max_failures", "train", "enqueue", "resources"]
    valid = clean = 0
    for _ in range(n):
        changes = {rng.choice(fields): rng.choice(leaves) for _ in range(rng.randint(1, 3))}
        try:
            load_config(support.tiny_study(**changes))
            valid += 1
        except ConfigError as exc:
            assert "\n" not in str(exc), str(exc)
            clean += 1
    return n, valid, clean


def injected_faults() -> tuple[int, int, int]:
    """(faults injected, faults recorded as FAIL with a reason and cleaned, trials completed)."""
    from test_reliability_failing_trials import FAULT_PLAN, faulty_study

    rankopt.register_plugin(support)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            result = rankopt.run_study(faulty_study(run_dir, FAULT_PLAN), progress=False)
            injected = sum(1 for _, state, _ in FAULT_PLAN if state == "FAIL")
            survived = 0
            for trial, (_, state, error) in zip(result.study.trials, FAULT_PLAN):
                folder = run_dir / "trials" / str(trial.number)
                if state == "FAIL" and trial.state.name == "FAIL" \
                        and trial.user_attrs.get("reason", "").startswith(error) \
                        and [p.name for p in folder.iterdir()] == ["metrics.json"]:
                    survived += 1
            return injected, survived, len(result.trials())
    finally:
        rankopt.manager.reset_registry()


def kills(n_kills: int, backend: str) -> tuple[int, int, int, int]:
    """Kill the driver ``n_kills`` times mid-trial, resuming each time, then finish.
    Returns (kills, kills after which the rerun recovered, trials wanted, trials lost)."""
    from test_reliability_crash_resume import kill_mid_trial, start, stored_complete

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_dir = work / "run"
        trials = n_kills + 2
        changes: dict[str, Any] = {"strategies": {"slow": {"sleep": 1.0}}}
        if backend == "ray":
            changes = {"backend": "ray", "max_concurrent": 1, "resources": {"cpus": 1, "gpus": 0},
                       "strategies": {"finetune": {"epochs": 8, "lr": 0.02}}}
        study = work / "study.yaml"
        study.write_text(yaml.safe_dump(support.tiny_study(run_dir=str(run_dir), trials=trials, **changes)))
        survived, lost = 0, 0
        kept: dict[int, int] = {}
        for k in range(n_kills):
            proc = start(support.cli_command("run", str(study), "--quiet"), work)
            try:
                kill_mid_trial(proc, run_dir, done=len(kept) + 1, timeout=300)
            finally:
                support.kill_group(proc)
            # every trial completed so far must still be there, unchanged
            now = stored_complete(run_dir)
            lost += sum(1 for n, t in kept.items() if now.get(n) != t)
            kept = now
            survived += support.sqlite_integrity(run_dir) == "ok"
        proc = start(support.cli_command("run", str(study), "--quiet"), work)
        try:
            proc.communicate(timeout=600)
        finally:
            support.kill_group(proc)
        states = [t.state.name for t in support.storage_trials(run_dir)]
        final = stored_complete(run_dir)
        lost += sum(1 for n, t in kept.items() if final.get(n) != t)
        lost += max(0, trials - states.count("COMPLETE"))
        if proc.returncode != 0 or "RUNNING" in states or support.sqlite_integrity(run_dir) != "ok":
            survived = 0
        return n_kills, survived, trials, lost


def concurrent(storage: str | None) -> tuple[int, int, int]:
    """Two workers on one study: (trials wanted, trials completed, trials lost or duplicated)."""
    from test_reliability_concurrent import run_two_workers

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trials = 8
        name = f"rely-{uuid.uuid4().hex[:8]}"
        changes: dict[str, Any] = {"name": name, "run_dir": str(work / "run"), "trials": trials,
                                   "strategies": {"slow": {"sleep": 0.5}}}
        if storage:
            changes["storage"] = storage
        try:
            run_two_workers(work, support.tiny_study(**changes))
            stored = support.storage_trials(work / "run", name, storage)
        finally:
            if storage:
                import optuna

                with contextlib.suppress(KeyError):
                    optuna.delete_study(study_name=name, storage=storage)
        complete = [t for t in stored if t.state.name == "COMPLETE"]
        numbers = [t.number for t in complete]
        wrong = abs(trials - len(complete)) + (len(numbers) - len(set(numbers)))
        return trials, len(complete), wrong


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--random-configs", type=int, default=500)
    parser.add_argument("--no-ray", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    start = time.perf_counter()

    tried, clean, bad = malformed_inputs()
    rows.append(("malformed study files and CLI calls (exit 2, one line, nothing written)",
                 tried, clean, "-", ", ".join(bad) or "-"))
    n, valid, clean_err = random_configs(args.random_configs)
    rows.append(("random config values (hypothesis-style): clean ConfigError or valid config",
                 n, valid + clean_err, "-", f"{valid} valid, {clean_err} ConfigError, 0 crashes"))
    injected, survived, completed = injected_faults()
    rows.append(("trial faults injected (NaN loss, OOM, plugin error, CP divergence x2, disk full)",
                 injected, survived, 0, f"study went on: {completed} trials completed"))
    k, ok, wanted, lost = kills(args.kills, "local")
    rows.append((f"SIGKILL of the local driver mid-trial, then rerun ({wanted} trials)", k, ok, lost, "-"))
    if not args.no_ray:
        k, ok, wanted, lost = kills(1, "ray")
        rows.append((f"SIGKILL of the Ray driver mid-trial, then rerun ({wanted} trials)", k, ok, lost, "-"))
    wanted, done, wrong = concurrent(None)
    rows.append(("two `rankopt run` workers, embedded SQLite", 1, int(wrong == 0), wrong,
                 f"{done}/{wanted} trials"))
    pg = os.environ.get("RANKOPT_TEST_POSTGRES_URL")
    if pg:
        wanted, done, wrong = concurrent(pg)
        rows.append(("two `rankopt run` workers, PostgreSQL server", 1, int(wrong == 0), wrong,
                     f"{done}/{wanted} trials"))
    else:
        rows.append(("two `rankopt run` workers, PostgreSQL server", 0, 0, "-",
                     "skipped: RANKOPT_TEST_POSTGRES_URL not set"))

    table = ["| scenario | tried | handled / survived | trials lost | notes |",
             "| --- | ---: | ---: | ---: | --- |"]
    table += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    total_lost = sum(r[3] for r in rows if isinstance(r[3], int))
    table.append(f"\nTrials lost in all scenarios: **{total_lost}**. "
                 f"Wall time {time.perf_counter() - start:.0f} s.")
    text = "\n".join(table)
    print(text)
    from _record import record

    command = ".venv/bin/python benchmarks/bench_reliability.py " + " ".join(sys.argv[1:])
    if pg:
        from rankopt.search.storage import _redact

        command = f"RANKOPT_TEST_POSTGRES_URL={_redact(pg)} {command}"
    record("Reliability: bad input, failing trials, kills, concurrent workers", text, command.strip())


if __name__ == "__main__":
    main_cli()
