"""Shared pieces of the reliability tests (issue 7) and ``benchmarks/bench_reliability.py``.

* :func:`tiny_study`: a study on the 8x8 digits with a width-8 CNN, seconds per trial.
* :func:`tree_snapshot`: every path under a folder with its size and mtime.
* In-process plugins that inject faults through the public plugin API
  (``rankopt.register_plugin(reliability_support)``): the strategy ``faulty`` fails in
  the way its ``fault`` parameter names, and ``slow`` sleeps before fine-tuning
  (for kill tests). The decomposer ``diverging_cp`` raises ``DecompositionError``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from optuna.distributions import CategoricalDistribution

from rankopt.core.errors import DecompositionError, PluginError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.decomposers.svd import SVDDecomposer
from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome
from rankopt.core.records import DecomposerInfo, StrategyInfo
from study_support import RANDOM, small_study

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAULTS = ("none", "nan_loss", "oom", "plugin_error", "cp_divergence", "disk_full")


def tiny_study(**changes: Any) -> dict[str, Any]:
    """A study of a few seconds per trial; ``changes`` replace top-level keys."""
    targets = {"dense_input_channels": 0}  # the 1-channel first conv is a target too
    return small_study("rely", **{"data": {"name": "digits", "batch_size": 128}, "reference": {"epochs": 0.5, "lr": 0.05},
                                  "decomposers": ["tucker2", "svd"], "targets": targets, "sampler": RANDOM,
                                  "selectors": {"energy": {"p": {"low": 0.6, "high": 0.95}}}, "trials": 2,
                                  "strategies": {"finetune": {"epochs": 0.1, "lr": 0.02}}, **changes})


def tree_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size if path.is_file() else 0, st.st_mtime_ns)
    return out


# -- fault-injecting plugins ------------------------------------------------------------------


class FaultyStrategy(Strategy):
    """Fine-tunes like ``finetune``, except when ``fault`` names a failure to raise.

    ``nan_loss`` trains with a NaN loss term (the trainer raises TrainingDivergedError),
    ``oom`` raises ``torch.OutOfMemoryError`` mid-trial, ``plugin_error`` a bug-like
    RuntimeError, ``cp_divergence`` a DecompositionError as CP-ALS does when it diverges,
    ``disk_full`` returns a model whose saving dies half-way with ENOSPC (a partial file).
    """

    name = "faulty"
    description = "test strategy: fails on demand"

    def defaults(self) -> dict[str, Any]:
        return {"fault": "none", "epochs": 0.05, "lr": 0.02}

    def search_space(self) -> dict[str, Any]:
        return {"fault": CategoricalDistribution(list(FAULTS))}

    def validate_params(self, params: Any) -> dict[str, Any]:
        merged = {**self.defaults(), **dict(params)}
        if merged["fault"] not in FAULTS:
            from rankopt.core.errors import ConfigError

            raise ConfigError(f"fault must be one of {list(FAULTS)}, got {merged['fault']!r}")
        return merged

    def run(self, ctx: TrialContext, params: dict[str, Any]) -> TrialOutcome:
        fault = params["fault"]
        model = ctx.model()
        if fault == "nan_loss":
            ctx.train(model, epochs=params["epochs"], lr=params["lr"],
                      extra_loss=lambda m: torch.tensor(math.nan))
        if fault == "cp_divergence":
            raise DecompositionError("CP-ALS diverged: reconstruction error is nan after 3 sweeps")
        spec = ctx.select_ranks(model)
        small = ctx.compress(model, spec)
        if fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if fault == "plugin_error":
            raise PluginError("strategy 'faulty' hit a bug: index 7 is out of range")
        ctx.train(small, epochs=params["epochs"], lr=params["lr"])
        if fault == "disk_full":
            # one of the model's own buffers becomes unsaveable (its shape still fits the spec)
            bn = next(m for m in small.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_mean = bn.running_mean.as_subclass(_DiskFullTensor)
        return TrialOutcome(small, spec)


class _DiskFullTensor(torch.Tensor):
    """A tensor whose pickling fails with ENOSPC: torch.save dies after opening its file."""

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise OSError(28, "No space left on device")


class SlowStrategy(Strategy):
    """``finetune`` that sleeps ``sleep`` seconds first: trials long enough to kill mid-study."""

    name = "slow"
    description = "test strategy: sleeps, then fine-tunes"

    def defaults(self) -> dict[str, Any]:
        return {"sleep": 1.0, "epochs": 0.05, "lr": 0.02}

    def search_space(self) -> dict[str, Any]:
        return {}

    def validate_params(self, params: Any) -> dict[str, Any]:
        return {**self.defaults(), **dict(params)}

    def run(self, ctx: TrialContext, params: dict[str, Any]) -> TrialOutcome:
        time.sleep(float(params["sleep"]))
        model = ctx.model()
        spec = ctx.select_ranks(model)
        small = ctx.compress(model, spec)
        ctx.train(small, epochs=params["epochs"], lr=params["lr"])
        return TrialOutcome(small, spec)


class DivergingCPDecomposer(SVDDecomposer):
    """SVD for Linear layers whose ``build`` diverges like a CP-ALS that blows up."""

    name = "diverging_cp"

    def build(self, module: Any, ranks: Any, **kwargs: Any) -> Any:
        raise DecompositionError(
            f"CP-ALS diverged on a {type(module).__name__} at ranks {tuple(ranks)}: "
            "the reconstruction error became inf"
        )


@hookimpl
def rankopt_strategies() -> list[StrategyInfo]:
    return [
        StrategyInfo("faulty", FaultyStrategy, "test strategy: fails on demand"),
        StrategyInfo("slow", SlowStrategy, "test strategy: sleeps, then fine-tunes"),
    ]


@hookimpl
def rankopt_decomposers() -> list[DecomposerInfo]:
    return [DecomposerInfo("diverging_cp", DivergingCPDecomposer, "test decomposer: always diverges")]


# -- a driver for subprocess tests: the CLI with these plugins registered ----------------------

DRIVER = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
import rankopt, reliability_support
rankopt.register_plugin(reliability_support)
from rankopt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli_command(*args: str) -> list[str]:
    """``python -c DRIVER args...``: ``rankopt`` with the test plugins, in a new process."""
    return [sys.executable, "-c", DRIVER, *args]


# -- helpers for process-level tests --------------------------------------------------------


def wait_for(predicate: Any, timeout: float, what: str, proc: Any = None) -> None:
    """Poll ``predicate()`` every 50 ms; fail with ``what`` after ``timeout`` seconds
    (or at once, with its output, when ``proc`` ended first)."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{out[-3000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def trial_metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """``{trial number: metrics.json}`` of the trials written so far."""
    import json

    out = {}
    for path in (Path(run_dir) / "trials").glob("*/metrics.json"):
        try:
            out[int(path.parent.name)] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def completed(run_dir: Path) -> list[int]:
    return sorted(n for n, m in trial_metrics(run_dir).items() if m.get("state") == "COMPLETE")


def storage_trials(run_dir: Path, name: str = "rely", url: str | None = None) -> list[Any]:
    """The study's trials, read straight from its storage."""
    import optuna

    from rankopt.search.storage import default_storage_url, open_storage

    storage = open_storage(url or default_storage_url(Path(run_dir)))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def sqlite_integrity(run_dir: Path) -> str:
    """SQLite's own ``PRAGMA integrity_check`` of the run's storage ("ok" when sound)."""
    import sqlite3

    with sqlite3.connect(Path(run_dir) / "optuna.db") as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


def kill_group(proc: Any) -> None:
    """SIGKILL what is left of a process started with ``start_new_session=True``."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def sqlite_states(run_dir: Path) -> dict[int, str]:
    """``{trial number: state}`` read straight from the run's SQLite file (cheap to poll)."""
    import sqlite3

    path = Path(run_dir) / "optuna.db"
    if not path.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return {int(n): str(s) for n, s in db.execute("SELECT number, state FROM trials")}
    except sqlite3.Error:  # tables not created yet
        return {}


POSTGRES_ENV = "RANKOPT_TEST_POSTGRES_URL"


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_ENV} (.ci/run installs and starts one)")
    import sqlalchemy

    from rankopt.search.storage_url import normalize_storage_url

    try:
        with sqlalchemy.create_engine(normalize_storage_url(url)).connect():
            pass
    except Exception as exc:  # any driver or connection failure: say which
        pytest.skip(f"PostgreSQL at {POSTGRES_ENV} is not reachable: {type(exc).__name__}: {exc}")
    return url
