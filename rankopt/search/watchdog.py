"""Faults contained: a trial that runs too long, or takes its process down, fails alone.

With ``trial_timeout: SECONDS`` or ``isolate: process`` in the study file, each local
trial runs in a child process (:func:`run_trial_contained`). The driver waits for the
child's metrics at most ``trial_timeout`` seconds; past that it kills the child's whole
process group (DataLoader workers included) and records the trial FAIL with the reason
``timeout: ...``. A child that ends without a result (a plugin's ``os._exit``, a
segfault, the kernel's OOM killer) fails its trial with a reason naming the exit code
or signal; the run goes on.

Why a process and not a watchdog thread: Python can only raise into a thread between
bytecodes, so a strategy blocked inside C code (a hung collective, a deadlocked
DataLoader) would never stop; a process can always be killed. Optuna has no per-trial
timeout (its ``timeout`` only stops new trials from starting), hence this module.

The child is forked, so it shares the trained reference and the data with the driver at
no copying cost, and in-process plugins (``rankopt.register_plugin``) work in it. Where
CUDA is already initialised in the driver a forked child cannot use it, so the child is
spawned instead (the trial's environment is pickled to it, as for Ray workers; plugins
then come from entry points).

Signals: :func:`interrupt_guard` in :mod:`rankopt.search.objective` turns SIGINT and
SIGTERM alike into the study's interruption; the child runs in its own process group,
so a terminal's Ctrl-C reaches only the driver, which kills the child.
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any

from rankopt.search.objective import TrialEnv, _finish, clean_trial_dir, run_trial
from rankopt.search.repeats import jsonable

__all__ = ["TIMEOUT_REASON", "contained", "run_trial_contained", "call_contained", "exit_reason"]

TIMEOUT_REASON = "timeout"
_POLL_S = 0.2  # how often the driver checks that the child is still alive
_EXIT_WAIT_S = 30.0  # how long a child that sent its result may take to exit


def contained(env: TrialEnv) -> bool:
    """True when the study's trials run in child processes (trial_timeout or isolate)."""
    config = env.config
    return config.trial_timeout is not None or config.isolate == "process"


def run_trial_contained(env: TrialEnv, number: int, values: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`~rankopt.search.objective.run_trial` in a child process (or in this one when
    the study asks for neither ``trial_timeout`` nor ``isolate: process``).

    Returns the trial's metrics, ``state: "FAIL"`` with the reason when the child ran past
    ``trial_timeout`` or died. A KeyboardInterrupt here (the user's Ctrl-C or SIGTERM)
    kills the child and passes on, as it does for a trial run in this process.
    """
    if not contained(env):
        return run_trial(env, number, values)
    return call_contained(env, number, values, run_trial, env, number, dict(values))


def call_contained(env: TrialEnv, number: int, values: Mapping[str, Any],
                   target: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``target(*args)`` (which runs trial ``number`` and returns its metrics) in a child
    process, under the study's ``trial_timeout``; ``values`` are the trial's parameters,
    for the metrics of a trial that gave none."""
    method = _start_method()
    ctx = multiprocessing.get_context(method)
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(env, target, args, writer, os.getpid()),
                        name=f"rankopt-trial-{number}", daemon=False)
    start = time.perf_counter()
    child.start()
    writer.close()  # the child holds the only write end: EOF once it ends
    limit = env.config.trial_timeout
    deadline = None if limit is None else time.monotonic() + float(limit)
    try:
        metrics = _wait(child, reader, deadline)
    except BaseException:
        _kill(child)
        raise
    finally:
        reader.close()
    if metrics is not None:
        child.join(timeout=_EXIT_WAIT_S)
        if child.is_alive():  # the result is in; whatever holds the child up is not needed
            _kill(child)
        return metrics
    child.join(timeout=0 if deadline is not None and time.monotonic() >= deadline else _EXIT_WAIT_S)
    if child.is_alive() and limit is not None:  # past the deadline
        _kill(child)
        reason = (f"{TIMEOUT_REASON}: the trial ran longer than trial_timeout "
                  f"({float(limit):g} s) and was stopped")
    elif child.is_alive():
        _kill(child)
        reason = "the trial's process closed its result pipe without a result and did not exit"
    else:
        reason = exit_reason(child.exitcode)
    return _failed(env, number, values, reason, start)


def _start_method() -> str:
    """``fork`` (no copy of the reference or data, in-process plugins kept), or ``spawn``
    where fork is missing or CUDA is initialised here (a forked child cannot use it)."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return "spawn"
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "spawn"
    return "fork"


def _wait(child: Any, reader: Any, deadline: float | None) -> dict[str, Any] | None:
    """The child's metrics, or None when it ended without them or ``deadline`` passed."""
    while True:
        wait = _POLL_S if deadline is None else min(_POLL_S, max(0.0, deadline - time.monotonic()))
        if reader.poll(wait):
            try:
                return dict(json.loads(reader.recv()))
            except (EOFError, OSError, ValueError):  # the child died before (or while) sending
                return None
        if not child.is_alive() and not reader.poll(0):
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return None


def _kill(child: Any) -> None:
    """SIGKILL the child's process group (it leads its own), then reap the child."""
    pid = child.pid
    if pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)  # in case it had not yet made its group
    child.join(timeout=30)


def exit_reason(code: int | None) -> str:
    """Why a trial's child process ended without a result, for the trial's ``reason``."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        what = {"SIGSEGV": "a segfault", "SIGKILL": "killed, e.g. by the kernel's OOM killer",
                "SIGABRT": "an abort"}.get(name, "a signal")
        return f"the trial's process died of {name} ({what}) without a result"
    return (f"the trial's process exited with code {code} without a result (a plugin "
            "called os._exit, or the interpreter stopped)")


def _failed(env: TrialEnv, number: int, values: Mapping[str, Any], reason: str,
            start: float) -> dict[str, Any]:
    """Record a trial whose child gave no result as FAIL: no partial model left behind."""
    trial_dir = env.trial_dir(number)
    trial_dir.mkdir(parents=True, exist_ok=True)
    clean_trial_dir(trial_dir)
    metrics: dict[str, Any] = {"trial": number, "state": "FAIL", "params_asked": dict(values),
                               "reason": reason}
    return _finish(env, trial_dir, metrics, start, None)


def _child_main(env: TrialEnv, target: Callable[..., dict[str, Any]], args: tuple[Any, ...],
                writer: Any, parent: int) -> None:
    """In the child: lead a process group of its own, die with the driver, run the trial,
    send its metrics (as JSON: no tensor travels through shared memory)."""
    import torch

    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # the driver can kill everything it starts; Ctrl-C reaches the driver only
    _die_with_parent(parent)
    # the driver decides what an interruption means; the child only stops when killed
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(max(1, math.ceil(env.config.resources.cpus)))  # as torch_threads in the driver
    try:
        metrics = target(*args)
        writer.send(json.dumps(metrics, default=jsonable))
    finally:
        writer.close()


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this process when the driver dies (a SIGKILLed driver leaves no
    trial running on behind the rerun's back)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the driver died before prctl took effect
        os._exit(1)
