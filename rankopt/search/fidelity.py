"""Multi-fidelity: train further only the models on or near the front.

With ``multi_fidelity: {rounds: R, epochs: E, keep: q}`` every trial of the search runs
at the strategy's own (short) budget, fidelity 0. Then, in each of ``R`` rounds, the
share ``q`` of the models at the previous fidelity with the best non-dominated rank
(Optuna's fast non-dominated sort over the study's objectives; within the rank that
does not fit whole, the subset adding the most hypervolume) are loaded from their ``model.pt`` and trained ``E`` more epochs (the
trial's own learning rate, optimizer and distillation, a fresh cosine schedule: a warm
restart). Each continuation is a new trial of the same parameters with ``fidelity`` one
higher and ``continued_from`` naming the trial it trained further; the front
(:meth:`rankopt.StudyResult.front`) then holds every model at the highest fidelity it
reached. This is multi-objective successive halving with the promotion step done once
the rung is full.

The promotion rule is written here because Optuna's pruners (successive halving,
Hyperband) support single-objective studies only, and Ray Tune's schedulers need a
single metric too.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from rankopt.compression.accounting import count
from rankopt.deploy.artifacts import load_compressed, save_compressed
from rankopt.core.errors import UnsafePathError
from rankopt.core.safe_paths import make_dirs
from rankopt.search.objective import (
    TrialEnv,
    _finish,
    clean_trial_dir,
    interrupts,
    trial_latency,
    objective_values,
    set_constraints,
    trial_context,
    user_attrs,
)
from rankopt.search.repeats import training_seed

__all__ = ["promotion_order", "promote", "run_promotions"]

TrialDone = Callable[[int, Mapping[str, Any], Mapping[str, Any]], None]


def promotion_order(values: Sequence[Sequence[float]], directions: Sequence[Any], keep: int) -> list[int]:
    """Indices of the ``keep`` points to promote: by non-dominated rank (rank 0 is the
    front), and within the rank that does not fit whole, the subset with the largest
    hypervolume (SMS-EMOA's reduction step; Optuna's greedy subset selection), against
    the worst value of each objective among ``values``: the points at either end of the
    front (an almost uncompressed model, a broken tiny one) add the least and go last."""
    # Optuna's NSGA-II sort and TPE's hypervolume subset selection (private helpers)
    from optuna._hypervolume import _solve_hssp
    from optuna.study._multi_objective import _fast_non_domination_rank

    if not values or keep <= 0:
        return []
    signs = [1.0 if d == optuna.study.StudyDirection.MINIMIZE else -1.0 for d in directions]
    loss = np.asarray([[s * float(v) for s, v in zip(signs, row)] for row in values], dtype=float)
    ranks = _fast_non_domination_rank(loss)
    reference = loss.max(axis=0)
    order: list[int] = []
    for rank in sorted(set(int(r) for r in ranks)):
        members = np.flatnonzero(ranks == rank)
        need = keep - len(order)
        if need <= 0:
            break
        if len(members) > need:
            members = _solve_hssp(loss[members], members, need, reference)
        order += [int(i) for i in members]
    return order


def _rung(study: optuna.Study, fidelity: int) -> list[FrozenTrial]:
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if int(t.user_attrs.get("fidelity", 0)) == fidelity and t.user_attrs.get("repeat_of") is None
        and "accuracy" in t.user_attrs
    ]


def promote(env: TrialEnv, study: optuna.Study, fidelity: int,
            on_trial_done: TrialDone | None = None) -> list[int]:
    """One round: continue the best share of the trials at ``fidelity``; returns the new
    trials' numbers (none for models continued before, e.g. in an earlier run)."""
    from rankopt.search.continuations import claim_continuation, wait_for_rung
    from rankopt.search.storage import default_storage_url

    mf = env.config.multi_fidelity
    assert mf is not None
    # every driver ranks the same full rung (exact counts with several drivers)
    wait_for_rung(study, env.config.storage or default_storage_url(env.run_dir), fidelity)
    rung = _rung(study, fidelity)
    # a continuation that failed or was interrupted is done again (not a FAIL one's source)
    continued = {t.user_attrs.get("continued_from") for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))}
    keep = max(1, math.ceil(mf.keep * len(rung))) if rung else 0
    picked = [rung[i] for i in promotion_order([t.values for t in rung], study.directions, keep)]
    from rankopt.search.continuation_runner import run_claimed

    numbers = []
    claimed = []
    for source in picked:
        trained = float(source.user_attrs.get("hyperparameters", {}).get("epochs", 0.0))
        if source.number in continued or mf.continuation_epochs(trained) <= 0:
            continue
        # a Ctrl-C or SIGTERM cuts the training only, never claiming or storing a trial
        with interrupts(deferred=True):
            trial = claim_continuation(study, source, fidelity + 1)
        if trial is not None:  # None: another driver continues this source
            claimed.append((trial, source))
    told: set[int] = set()
    try:
        # the study's backend runs them (Ray: its resources and max_concurrent)
        with interrupts(deferred=False):
            for trial, source, metrics in run_claimed(env, claimed, fidelity + 1, here=continue_contained,
                                                      remote=continue_trial):
                with interrupts(deferred=True):
                    values = dict(source.params)
                    for key, value in user_attrs(metrics).items():
                        trial.set_user_attr(key, value)
                    set_constraints(trial, env.config, metrics)
                    if metrics["state"] == "COMPLETE":
                        study.tell(trial, objective_values(metrics, env.config.objectives))
                    else:
                        study.tell(trial, state=TrialState.FAIL)
                    told.add(trial.number)
                if on_trial_done is not None:
                    on_trial_done(trial.number, values, metrics)
                numbers.append(trial.number)
    except BaseException:  # no continuation may stay RUNNING
        for trial, _ in claimed:
            if trial.number not in told:
                _interrupted(env, study, trial)
        raise
    return numbers


def continue_contained(env: TrialEnv, number: int, source: FrozenTrial, fidelity: int) -> dict[str, Any]:
    """:func:`continue_trial`, in a child process under ``trial_timeout`` / ``isolate``."""
    from rankopt.search.watchdog import call_contained, contained

    if not contained(env):
        return continue_trial(env, number, source, fidelity)
    return call_contained(env, number, source.params, continue_trial, env, number, source, fidelity)


def _interrupted(env: TrialEnv, study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark an interrupted continuation FAIL (``interrupted``) and drop its partial folder;
    the next run's promotion step does it again."""
    import contextlib

    from rankopt.search.rundir import INTERRUPTED_REASON

    with contextlib.suppress(Exception):  # the storage may be what was interrupted
        trial.set_user_attr("reason", INTERRUPTED_REASON)
        study.tell(trial, state=TrialState.FAIL)
    clean_trial_dir(env.trial_dir(trial.number), reason=INTERRUPTED_REASON)


def continue_trial(env: TrialEnv, number: int, source: FrozenTrial, fidelity: int) -> dict[str, Any]:
    """Train the model of trial ``source`` further (``multi_fidelity``'s
    ``continuation_epochs``); trial ``number``."""
    from rankopt.plugins.strategies._common import distill_params

    mf = env.config.multi_fidelity
    assert mf is not None
    start = time.perf_counter()
    trial_dir = env.trial_dir(number)
    try:
        make_dirs(env.run_dir, trial_dir)
    except UnsafePathError as exc:  # a link or file planted where the folder goes: write nothing
        return {"trial": number, "state": "FAIL", "reason": f"UnsafePathError: {exc}"}
    attrs = source.user_attrs
    hp = dict(attrs.get("hyperparameters", {}))
    metrics: dict[str, Any] = {
        "trial": number, "state": "RUNNING", "params_asked": dict(source.params),
        "strategy": attrs.get("strategy"), "selector": attrs.get("selector"),
        "hyperparameters": hp, "selector_params": attrs.get("selector_params", {}),
        "fidelity": fidelity, "continued_from": source.number,
    }
    ctx = None
    try:
        seed = training_seed(env.config.seed, attrs.get("resolved_key") or source.params, fidelity=fidelity)
        ctx = trial_context(env, env.space.plan(source.params), seed=seed)
        if not (env.trial_dir(source.number) / "model.pt").is_file() and env.store is not None:
            # the source ran on another driver or node: its model is in the artifact store
            env.store.fetch_trial(source.number, env.trial_dir(source.number))
        model = load_compressed(env.trial_dir(source.number) / "model.pt",
                                copy.deepcopy(env.reference), map_location="cpu").to(ctx.device)
        ctx.compressed_layers = list(attrs.get("ranks", {}))  # what feature distillation matches
        options = {"optimizer": hp["optimizer"]} if "optimizer" in hp else {}
        ctx.train(model, epochs=mf.continuation_epochs(float(hp.get("epochs", 0.0))), lr=float(hp.get("lr", 0.01)),
                  **options, **distill_params(str(attrs.get("strategy")), hp))
        accuracy = ctx.evaluate(model)
        cost = count(model, env.input_shape, device=ctx.device)
        spec = {name: {"decomposer": attrs["decomposers"][name], "ranks": list(r)}
                for name, r in attrs.get("ranks", {}).items()}
        metrics.update(
            state="COMPLETE", accuracy=accuracy, params=cost.params, flops=cost.flops,
            params_compression=env.baseline["params"] / cost.params if cost.params else math.inf,
            flops_compression=env.baseline["flops"] / cost.flops if cost.flops else math.inf,
            ranks=attrs.get("ranks", {}), decomposers=attrs.get("decomposers", {}),
            ranks_summary=attrs.get("ranks_summary", ""), reference_key=env.reference_key,
            extra={"accuracy_before": float(attrs["accuracy"])},
        )
        if "latency" in env.config.objectives:
            metrics.update(trial_latency(model, env, ctx.device))
        save_compressed(trial_dir / "model.pt", model, spec, base=env.base, input_shape=env.input_shape,
                        metadata={"study": env.config.name, "trial": number, "accuracy": accuracy,
                                  "params": cost.params, "flops": cost.flops,
                                  "strategy": attrs.get("strategy"), "fidelity": fidelity})
    except Exception as exc:  # a failing continuation must not end the study
        import traceback

        metrics.update(state="FAIL", reason=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc(limit=20))
        clean_trial_dir(trial_dir)
    return _finish(env, trial_dir, metrics, start, ctx)


def run_promotions(env: TrialEnv, study: optuna.Study, on_trial_done: TrialDone | None = None) -> list[int]:
    """Every round of ``multi_fidelity`` in turn; returns the new trials' numbers."""
    mf = env.config.multi_fidelity
    if mf is None:
        return []
    numbers: list[int] = []
    for fidelity in range(mf.rounds):
        numbers += promote(env, study, fidelity, on_trial_done)
    return numbers
