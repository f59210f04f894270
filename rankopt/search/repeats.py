"""Repeated trials: a trial whose model (ranks after rounding and the selector) and
hyperparameters equal a finished trial's reports that trial's result instead of training
the same model again (issue 18, "no repeated work")."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rankopt.compression.surgery import normalize_spec

if TYPE_CHECKING:  # annotations only
    from rankopt.search.space import TrialPlan
    from rankopt.training.trial import LocalTrialContext

__all__ = ["REPEATED", "find_repeat", "jsonable", "resolved_key", "rounded", "training_seed"]


def jsonable(value: Any) -> Any:
    """``json.dumps``' fallback for tensors, numpy scalars, tuples and sets."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, set)):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def resolved_key(ctx: LocalTrialContext, plan: TrialPlan, strategy: Any,
                 hyperparameters: Mapping[str, Any]) -> str:
    """What a trial trains, once ranks are rounded and the selector resolved: two trials
    with the same key train the same model (up to the training seed).

    A strategy that selects ranks on the reference (``selects_on_reference``) is keyed
    by the ranks the selector gives there (different thresholds that round to the same
    ranks are one model); the others select after their own training, so their key is
    the selector and its checked parameters.
    """
    from rankopt.compression.selection import select_spec

    key: dict[str, Any] = {"strategy": plan.strategy, "hyperparameters": dict(hyperparameters)}
    if getattr(strategy, "selects_on_reference", False):
        spec, _ = select_spec(ctx.model(), ctx.targets, ctx.layer_decomposers, ctx.selector,
                              ctx.selector_params, cache=ctx.cache, input_shape=ctx.input_shape,
                              rank_multiple=ctx.rank_multiple, min_in_channels=ctx.min_in_channels,
                              min_saving=ctx.min_saving)
        key["spec"] = {n: {"decomposer": e["decomposer"], "ranks": list(e["ranks"])}
                       for n, e in sorted(normalize_spec(spec).items())}
    else:
        key.update(selector=plan.selector, selector_params=ctx.selector_params,
                   decomposers=dict(sorted(plan.decomposers.items())))
    return json.dumps(rounded(key), sort_keys=True, default=jsonable)


def rounded(value: Any) -> Any:
    """``value`` with every float at 12 significant digits: a sampler's log-scale
    arithmetic gives 0.05000000000000001 for the 0.05 of an earlier trial."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


# what a repeat copies from the trial it repeats (not its timings or its own number)
REPEATED = ("accuracy", "params", "flops", "latency_ms", "params_compression",
             "flops_compression", "ranks", "decomposers", "ranks_summary", "extra", "reported",
             "fidelity")


def find_repeat(run_dir: Path, key: str, number: int) -> dict[str, Any] | None:
    """The metrics of a finished first-fidelity trial (other than ``number``) with ``key``.

    Read from ``trials/*/metrics.json`` rather than the Optuna storage so that it works
    the same in a Ray worker, which has no study object; the lowest number wins.
    """
    best: tuple[int, dict[str, Any]] | None = None
    for path in (run_dir / "trials").glob("*/metrics.json"):
        if not path.parent.name.isdigit() or int(path.parent.name) == number:
            continue
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a half-written or unreadable file is not a result
        if (metrics.get("state") == "COMPLETE" and metrics.get("resolved_key") == key
                and metrics.get("repeat_of") is None and metrics.get("continued_from") is None
                and (best is None or int(path.parent.name) < best[0])):
            best = (int(path.parent.name), metrics)
    return None if best is None else best[1]


def training_seed(study_seed: int, trains: str | Mapping[str, Any], *, fidelity: int = 0) -> int:
    """The seed a trial trains with, in [0, 2**32): a hash of the study seed, what the trial
    trains (its resolved key, :func:`~rankopt.search.repeats.resolved_key`, or its
    parameters, floats at 12 significant digits) and its fidelity rung. The same model
    gets the same seed in any trial, run or process, so a trial rerun under another number
    and a repeat of it train the same weights; another rung gives another seed (a
    continuation is new training)."""
    what = trains if isinstance(trains, str) else rounded(dict(trains))
    key = json.dumps({"seed": int(study_seed), "trains": what, "fidelity": int(fidelity)},
                     sort_keys=True, default=jsonable)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
