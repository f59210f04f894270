"""Screening: a cheap no-fine-tune proxy that picks where the search starts.

With ``screening: {candidates: C, keep: K}`` a study, before its first trial, tries ``C``
rank choices of its own search space *without any training*: each is decomposed from
the reference and evaluated on the validation split as is (the proxy accuracy), and
its params / FLOPs are counted. That costs one evaluation per candidate instead of a
fine-tuning run. An Optuna multi-objective TPE sampler (seeded by the study's sampler
seed) proposes the candidates, maximizing the proxy accuracy and minimizing the
study's first cost objective (``params``, else ``flops``).

The ``K`` kept points are spread evenly, on a log scale of that cost, along the proxy's
Pareto front (for every cost, the rank allocation that loses the least accuracy before
fine-tuning), and enqueued as the search's first trials after any ``enqueue`` and
``seed_proposals`` points. Their strategy part is the study's first strategy with its
default hyperparameters, as in :mod:`rankopt.search.seeding`, since a proxy without
training says nothing about training.

Screening runs once, in the driver process, on the study's device, and only while the
study has no trials (a rerun continues the search instead). What it tried is written to
``screening.json`` in the run directory. The proxy is blind to what fine-tuning
recovers, so it ranks rank allocations at equal cost, not cost levels: the spread over
the front, and the sampler afterwards, decide how far to compress.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna

from rankopt.compression.accounting import count
from rankopt.search.front import pareto_front_2d
from rankopt.search.objective import TrialEnv, trial_context, write_json
from rankopt.search.seeding import strategy_point

__all__ = ["ScreenedCandidate", "ScreeningResult", "screen", "screen_study", "spread_along_front"]

SCREENING_FILE = "screening.json"


@dataclass(frozen=True)
class ScreenedCandidate:
    """One rank choice tried without training."""

    number: int
    values: dict[str, Any]
    accuracy: float | None  # None: the candidate failed (``reason``)
    params: int | None
    flops: int | None
    seconds: float
    reason: str | None = None


@dataclass
class ScreeningResult:
    """The candidates screened and the points kept for the search."""

    cost: str  # the cost the front was taken against
    candidates: list[ScreenedCandidate] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    kept_numbers: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "cost": self.cost,
            "seconds": self.seconds,
            "kept": self.kept,
            "kept_candidates": self.kept_numbers,
            "candidates": [c.__dict__ for c in self.candidates],
        }


def spread_along_front(points: list[tuple[float, float]], keep: int) -> list[int]:
    """Indices of up to ``keep`` points of the (accuracy up, cost down) front of ``points``,
    spread evenly over the front's log cost (its cheapest and dearest ends included)."""
    front = sorted(pareto_front_2d(points), key=lambda i: points[i][1])
    if len(front) <= keep:
        return front
    logs = [math.log(max(points[i][1], 1e-12)) for i in front]
    lo, hi = logs[0], logs[-1]
    chosen: list[int] = []
    for k in range(keep):
        target = lo + (hi - lo) * k / max(1, keep - 1)
        # the nearest front point not taken yet
        best = min((j for j in range(len(front)) if front[j] not in chosen),
                   key=lambda j: abs(logs[j] - target))
        chosen.append(front[best])
    return sorted(chosen, key=lambda i: points[i][1])


def _evaluate(env: TrialEnv, number: int, values: Mapping[str, Any]) -> ScreenedCandidate:
    start = time.perf_counter()
    try:
        ctx = trial_context(env, env.space.plan(values), seed=env.config.seed)
        model = ctx.model()
        compressed = ctx.compress(model, ctx.select_ranks(model))
        accuracy = ctx.evaluate(compressed)
        cost = count(compressed, env.input_shape, device=ctx.device)
        return ScreenedCandidate(number, dict(values), accuracy, cost.params, cost.flops,
                                 time.perf_counter() - start)
    except Exception as exc:  # a failing candidate is skipped, like a failing trial
        return ScreenedCandidate(number, dict(values), None, None, None,
                                 time.perf_counter() - start, f"{type(exc).__name__}: {exc}")


def screen(
    env: TrialEnv,
    candidates: int,
    keep: int,
    *,
    on_candidate: Callable[[ScreenedCandidate], None] | None = None,
) -> ScreeningResult:
    """Screen ``candidates`` rank choices without training; keep ``keep`` of them.

    Writes ``screening.json`` to the run directory and returns the result; its
    ``kept`` points are flat parameter dicts, as ``enqueue`` takes them.
    """
    config = env.config
    cost = next((o for o in config.objectives if o in ("params", "flops")), "params")
    result = ScreeningResult(cost=cost)
    start = time.perf_counter()
    from rankopt.search.local import quiet_optuna

    with quiet_optuna(), warnings.catch_warnings():
        # multivariate/group TPE are chosen on purpose; their "experimental" notice is noise
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=config.sampler.seed, multivariate=True, group=True,
            n_startup_trials=min(10, max(1, candidates // 4)),
        )
        proxy = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        for number in range(candidates):
            trial = proxy.ask()
            values = env.space.suggest(trial)
            candidate = _evaluate(env, number, values)
            result.candidates.append(candidate)
            if candidate.accuracy is None:
                proxy.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                proxy.tell(trial, [candidate.accuracy, float(getattr(candidate, cost))])
            if on_candidate is not None:
                on_candidate(candidate)
    done = [c for c in result.candidates if c.accuracy is not None]
    points = [(float(c.accuracy), float(getattr(c, cost))) for c in done]  # type: ignore[arg-type]
    common = strategy_point(env.space)
    for i in spread_along_front(points, keep):
        point = {k: v for k, v in done[i].values.items() if not _is_strategy_key(k, env)}
        point.update(common)
        if point not in result.kept:
            result.kept.append(point)
            result.kept_numbers.append(done[i].number)
    result.seconds = time.perf_counter() - start
    write_json(env.run_dir / SCREENING_FILE, result.as_json())
    return result


def _is_strategy_key(key: str, env: TrialEnv) -> bool:
    return key == "strategy" or key.split(".", 1)[0] in env.space.strategies


def screen_study(env: Any, show: Any) -> list[dict[str, Any]]:
    """Run the study's screening (the no-fine-tune proxy) and return the points it keeps."""
    screening = env.config.screening
    show.message(
        f"screening {screening.candidates} rank choices without training (keeping "
        f"{screening.keep} to start the search)"
    )
    step = max(1, screening.candidates // 10)

    def tick(candidate: Any) -> None:
        if (candidate.number + 1) % step == 0:
            show.message(f"  screened {candidate.number + 1}/{screening.candidates}")

    # `screen` is this module's, looked up at call time (a test replaces it)
    result = screen(env, screening.candidates, screening.keep, on_candidate=tick)
    failed = sum(c.accuracy is None for c in result.candidates)
    show.message(
        f"screening done in {result.seconds:.0f} s: {len(result.kept)} points kept"
        + (f", {failed} candidates failed" if failed else "")
        + f" (see {env.run_dir / 'screening.json'})"
    )
    return result.kept
