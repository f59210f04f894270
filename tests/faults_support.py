"""Plugins that take a trial's process down or never return (issue 26, items 7 and 8).

``rankopt.register_plugin(faults_support)`` adds the strategy ``crashy``: it fine-tunes
like ``finetune`` after doing what its ``act`` parameter names: ``none``, ``hang`` (a
sleep loop that never ends), ``exit`` (``os._exit(3)``, as a plugin that calls it), or
``segv`` (a segfault, reading address 0 through ctypes); and ``sleep`` seconds first
(trials long enough to interrupt). ``cli_command`` runs ``rankopt`` with it registered,
in a new process.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution

from rankopt.contract.hookspecs import hookimpl
from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome
from rankopt.core.records import StrategyInfo

HERE = Path(__file__).resolve().parent
ACTS = ("none", "hang", "exit", "segv")


class CrashyStrategy(Strategy):
    """``finetune`` after sleeping ``sleep`` seconds and doing ``act``."""

    name = "crashy"
    description = "test strategy: hangs or kills its process on demand"

    def defaults(self) -> dict[str, Any]:
        return {"act": "none", "sleep": 0.0, "epochs": 0.1, "lr": 0.02}

    def search_space(self) -> dict[str, Any]:
        return {"act": CategoricalDistribution(list(ACTS))}

    def validate_params(self, params: Any) -> dict[str, Any]:
        return {**self.defaults(), **dict(params)}

    def run(self, ctx: TrialContext, params: dict[str, Any]) -> TrialOutcome:
        time.sleep(float(params["sleep"]))
        act = params["act"]
        if act == "hang":
            while True:  # a strategy stuck for ever (e.g. waiting on a lost peer)
                time.sleep(0.05)
        if act == "exit":
            os._exit(3)
        if act == "segv":
            ctypes.string_at(0)
        model = ctx.model()
        spec = ctx.select_ranks(model)
        small = ctx.compress(model, spec)
        ctx.train(small, epochs=float(params["epochs"]), lr=float(params["lr"]))
        return TrialOutcome(small, spec)


@hookimpl
def rankopt_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("crashy", CrashyStrategy, "test strategy: hangs or kills its process")]


DRIVER = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
import torch
torch.set_num_threads(1)
import rankopt, faults_support, reliability_support
rankopt.register_plugin(faults_support)
rankopt.register_plugin(reliability_support)
faults_support.slow_continuations()
from rankopt.cli import main
sys.exit(main(sys.argv[1:]))
"""
CONTINUATION_SLEEP = "RANKOPT_TEST_CONTINUATION_SLEEP"


def slow_continuations() -> None:
    """With ``$RANKOPT_TEST_CONTINUATION_SLEEP`` set, every multi-fidelity continuation
    sleeps that many seconds first (long enough for a test to interrupt the rung)."""
    pause = float(os.environ.get(CONTINUATION_SLEEP, "0") or 0)
    if pause <= 0:
        return
    from rankopt.search import fidelity

    real = fidelity.continue_trial

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(pause)
        return real(*args, **kwargs)

    fidelity.continue_trial = slow


def cli_command(*args: str) -> list[str]:
    """``python -c DRIVER args...``: ``rankopt`` with the test plugins, in a new process."""
    return [sys.executable, "-c", DRIVER, *args]
