"""The contract checks of a training :class:`~rankopt.Strategy`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from optuna.distributions import BaseDistribution

from rankopt.core.errors import ConfigError
from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome
from rankopt.compression.surgery import compress, normalize_spec
from rankopt.testing._core import (
    CheckFailed,
    CheckResult,
    Checks,
    raise_on_failures,
    require,
    require_identity,
    require_json,
    seeded,
)
from rankopt.testing.samples import TINY_INPUT_SHAPE, tiny_model, tiny_splits
from rankopt.testing.selectors import default_decomposer, space_corners

__all__ = ["check_strategy", "assert_strategy", "tiny_trial_context"]

UNKNOWN_PARAM = "no_such_hyperparameter_xyz"
# "fixed" at a quarter of the largest ranks makes every layer of the tiny model smaller
PREFERRED_SELECTORS: tuple[tuple[str, dict[str, Any]], ...] = (("fixed", {"fraction": 0.25}), ("energy", {"p": 0.5}))
MAX_TRAIN_STEPS = 6


def _default_selector() -> tuple[str, dict[str, Any]]:
    from rankopt.contract.manager import get_registry

    names = get_registry().names("rank_selectors")
    for name, params in PREFERRED_SELECTORS:
        if name in names:
            return name, params
    if names:
        return names[0], {}
    raise CheckFailed("no rank selector is registered; pass context= to run a strategy")


def tiny_trial_context(
    *,
    decomposer: str | None = None,
    selector: str | None = None,
    selector_params: Mapping[str, Any] | None = None,
    max_steps: int = MAX_TRAIN_STEPS,
    seed: int = 0,
) -> TrialContext:
    """A real :class:`rankopt.training.trial.LocalTrialContext` on a tiny CNN and tiny synthetic data.

    Every ``train`` call stops after ``max_steps`` optimizer steps (whatever epochs a
    strategy asks for), so a strategy runs end to end in about a second on a CPU.
    ``decomposer`` defaults to the registered ``tucker2`` (else ``svd``, else the first
    one); ``selector`` to ``fixed`` with ``fraction=0.25`` (else ``energy`` with
    ``p=0.5``, else the first one), so that the layers really are compressed.
    """
    from rankopt.training.trial import LocalTrialContext

    dec_name = decomposer or default_decomposer().name
    if selector is None:
        selector, default_params = _default_selector()
        selector_params = {**default_params, **dict(selector_params or {})}
    with seeded(seed):
        net = tiny_model()
    return LocalTrialContext(
        net,
        tiny_splits(seed=seed),
        input_shape=TINY_INPUT_SHAPE,
        decomposers=dec_name,
        selector=selector,
        selector_params=selector_params,
        device="cpu",
        seed=seed,
        batch_size=8,
        train_options={"max_steps": max_steps, "amp": False},
    )


def _shapes(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_strategy(
    strategy: Strategy,
    *,
    run: bool = True,
    context: TrialContext | None = None,
    params: Mapping[str, Any] | None = None,
) -> list[CheckResult]:
    """Run ``strategy`` through the strategy contract.

    Args:
        strategy: an instance.
        run: also run one trial on ``context``.
        context: the trial context to run on (default: :func:`tiny_trial_context`).
        params: the hyperparameters of that run (default: ``defaults()``).

    Checks: ``search_space()`` maps names to Optuna distributions and every corner
    of it passes ``validate_params``; ``defaults()`` are JSON, inside the search
    space where both name a hyperparameter, and ``validate_params({})`` fills them in;
    an unknown hyperparameter fails with a ConfigError naming it; and (``run``) a
    trial returns a :class:`~rankopt.TrialOutcome` whose spec is valid, whose model has
    exactly the state_dict keys and shapes of ``rankopt.compress(reference, spec)``,
    gives finite logits of the right shape, and whose ``extra`` is JSON.
    """
    checks = Checks(f"strategy {getattr(strategy, 'name', strategy)!r}")

    def identity() -> str:
        require_identity(strategy, Strategy)
        return f"name {strategy.name!r}"

    def space_ok() -> str:
        space = strategy.search_space()
        require(isinstance(space, dict), f"search_space() must return a dict, got {type(space).__name__}")
        for k, d in space.items():
            require(isinstance(k, str) and bool(k), f"hyperparameter names must be non-empty strings, got {k!r}")
            require(isinstance(d, BaseDistribution), f"search_space()[{k!r}] must be an Optuna distribution, got {type(d).__name__}")
        corners = space_corners(space)
        for values in corners:
            strategy.validate_params(values)
        return f"{sorted(space)}, {len(corners)} corner set(s) valid"

    def defaults_ok() -> str:
        d = strategy.defaults()
        require(isinstance(d, dict), f"defaults() must return a dict, got {type(d).__name__}")
        require_json(d, "defaults()")
        space = strategy.search_space()
        for k in set(d) & set(space):
            dist = space[k]
            try:
                inside = dist._contains(dist.to_internal_repr(d[k]))
            except Exception:
                inside = False
            require(inside, f"default {k}={d[k]!r} lies outside its search space {dist}")
        full = strategy.validate_params({})
        missing = sorted(set(d) - set(full))
        require(not missing, f"validate_params({{}}) dropped the defaults {missing}")
        return f"{d}"

    def rejects_unknown() -> str:
        try:
            strategy.validate_params({UNKNOWN_PARAM: 1})
        except ConfigError as exc:
            require(UNKNOWN_PARAM in str(exc), f"the error does not name the unknown hyperparameter: {exc}")
            return "ConfigError names it"
        raise CheckFailed(f"validate_params accepted an unknown hyperparameter {UNKNOWN_PARAM!r}")

    def run_ok() -> str:
        ctx = context if context is not None else tiny_trial_context()
        hp = dict(params) if params is not None else strategy.validate_params({})
        outcome = strategy.run(ctx, hp)
        require(isinstance(outcome, TrialOutcome), f"run() must return a TrialOutcome, got {type(outcome).__name__}")
        require(isinstance(outcome.model, nn.Module), f"TrialOutcome.model must be an nn.Module, got {type(outcome.model).__name__}")
        spec = normalize_spec(outcome.spec)
        rebuilt = compress(ctx.model(), spec, initialize=False)
        expected, actual = _shapes(rebuilt), _shapes(outcome.model)
        if expected != actual:
            only_e = sorted(set(expected) - set(actual))[:5]
            only_a = sorted(set(actual) - set(expected))[:5]
            differ = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])[:5]
            raise CheckFailed(
                "the outcome's model does not match its spec: "
                f"missing {only_e}, unexpected {only_a}, different shapes/dtypes {differ}"
            )
        rebuilt.load_state_dict(outcome.model.state_dict())
        shape = getattr(ctx, "input_shape", None)
        if shape is not None:
            outcome.model.eval()
            with torch.no_grad():
                logits = outcome.model(torch.randn(2, *tuple(shape)[1:], device=ctx.device))
            require(logits.shape[0] == 2, f"logits have shape {tuple(logits.shape)} for a batch of 2")
            require(bool(torch.isfinite(logits).all()), "the trained model gives non-finite logits")
        require(isinstance(outcome.extra, dict), f"TrialOutcome.extra must be a dict, got {type(outcome.extra).__name__}")
        require_json(outcome.extra, "TrialOutcome.extra")
        layers = ", ".join(f"{k} {v['ranks']}" for k, v in spec.items())
        return f"{len(spec)} layer(s) compressed: {layers}"

    with seeded(0):  # training reseeds torch, NumPy and random: restore the caller's states
        checks.run("identity", identity)
        checks.run("search_space", space_ok)
        checks.run("defaults", defaults_ok)
        checks.run("rejects_unknown_params", rejects_unknown)
        if run:
            checks.run("run_tiny_trial", run_ok)
    return checks.results


def assert_strategy(strategy: Strategy, **kwargs: Any) -> None:
    """:func:`check_strategy`, raising one AssertionError that lists every failed check."""
    raise_on_failures(f"strategy {getattr(strategy, 'name', strategy)!r}", check_strategy(strategy, **kwargs))
