"""The contract checks of a :class:`~rankopt.RankSelector`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.nn as nn
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from rankopt.core.errors import ConfigError
from rankopt.contract.decomposer import Decomposer
from rankopt.contract.selector import RankSelector
from rankopt.compression.spectral import SpectralCache
from rankopt.compression.surgery import find_layers
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
from rankopt.testing.samples import TINY_INPUT_SHAPE, tiny_model

__all__ = ["check_rank_selector", "assert_rank_selector", "space_corners", "default_decomposer"]

UNKNOWN_PARAM = "no_such_parameter_xyz"
PREFERRED_DECOMPOSERS = ("tucker2", "svd")


def default_decomposer() -> Decomposer:
    """The registered decomposer the checks use when none is given (tucker2, else svd, else the first)."""
    from rankopt.contract.manager import get_registry

    reg = get_registry()
    names = reg.names("decomposers")
    for name in (*PREFERRED_DECOMPOSERS, *names):
        if name in names:
            try:
                return reg.create("decomposers", name)  # type: ignore[no-any-return]
            except Exception:
                continue
    raise CheckFailed("no decomposer is registered; pass decomposer= to check a rank selector")


def _values(dist: BaseDistribution) -> list[Any]:
    """The corner values of a distribution: its bounds (and middle), or every choice."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution):
        mid = dist.low + ((dist.high - dist.low) // 2 // dist.step) * dist.step
        return list(dict.fromkeys([dist.low, mid, dist.high]))
    if isinstance(dist, FloatDistribution):
        if dist.log:
            mid = math.sqrt(dist.low * dist.high)
        elif dist.step:
            mid = dist.low + round((dist.high - dist.low) / 2 / dist.step) * dist.step
        else:
            mid = (dist.low + dist.high) / 2
        return list(dict.fromkeys([dist.low, mid, dist.high]))
    raise CheckFailed(f"unsupported distribution type {type(dist).__name__}")


def space_corners(space: Mapping[str, BaseDistribution]) -> list[dict[str, Any]]:
    """Parameter sets covering every corner value of every distribution (one varied at a time).

    Each set also holds the middle value of the other distributions, so a search space
    of n distributions with k values each yields about n*k sets (not k**n).
    """
    middles = {}
    for name, dist in space.items():
        vals = _values(dist)
        middles[name] = vals[len(vals) // 2]
    sets = [dict(middles)] if middles else []
    for name, dist in space.items():
        for v in _values(dist):
            if v != middles[name]:
                sets.append({**middles, name: v})
    return sets


def check_rank_selector(
    selector: RankSelector,
    decomposer: Decomposer | Sequence[Decomposer] | None = None,
    *,
    model: nn.Module | None = None,
    input_shape: Sequence[int] = TINY_INPUT_SHAPE,
    params: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> list[CheckResult]:
    """Run ``selector`` through the rank-selector contract.

    Args:
        selector: an instance.
        decomposer: the decomposer to select ranks for, or several (then the checks
            that select ranks run once per decomposer, named ``check [decomposer]``).
            Default: the registered ``tucker2``, else ``svd``, else the first
            registered one. ``rankopt plugins --check`` passes every installed
            decomposer the selector claims to work with.
        model, input_shape: the model whose layers are used (default: a tiny CNN).
        params: parameter sets to try (default: the defaults, and every corner of the
            search space, one distribution at a time).
        seed: seeds the model's weights.

    Checks: ``search_space(layers)`` maps names to Optuna distributions whose values
    ``validate_params`` accepts; ``defaults()`` are JSON and valid; an unknown parameter
    is rejected by ``validate_params`` (ConfigError) and by ``select``; for every
    parameter set, ``select`` and ``select_layers`` give integer ranks in
    ``[1, max_ranks]`` on every layer the decomposer supports, the same with a fresh
    :class:`~rankopt.SpectralCache` as with another (deterministic). A selector with
    ``needs_rank_matrices`` given a decomposer without ``rank_matrices`` must refuse
    it with a ConfigError instead (check ``refuses_without_rank_matrices``).
    """
    checks = Checks(f"rank selector {getattr(selector, 'name', selector)!r}")

    def identity() -> str:
        require_identity(selector, RankSelector)
        return f"name {selector.name!r}"

    checks.run("identity", identity)
    try:
        if decomposer is None:
            decs = [default_decomposer()]
        elif isinstance(decomposer, Decomposer):
            decs = [decomposer]
        else:
            decs = list(decomposer)
        require(bool(decs), "no decomposer to check the selector with")
        with seeded(seed):
            net = (model if model is not None else tiny_model()).eval()
        found = find_layers(net, tuple(input_shape))
        per_dec, unusable = [], []
        for dec in decs:
            try:
                layers = [la for la in found if dec.supports(net.get_submodule(la.name))]
                require(bool(layers), f"decomposer {dec.name!r} supports none of the model's layers")
                per_dec.append((dec, layers))
            except Exception as exc:
                if len(decs) == 1:
                    raise
                # one odd decomposer must not fail the selector: say why it was not used
                unusable.append((dec, f"{type(exc).__name__}: {exc}" if not isinstance(exc, CheckFailed) else str(exc)))
        require(bool(per_dec), f"none of the decomposers {[d.name for d in decs]} supports a layer of the model")
    except Exception as exc:
        checks.fail("setup", f"{type(exc).__name__}: {exc}")
        return checks.results
    for dec, why in unusable:
        checks.skip(f"ranks_within_bounds [{dec.name}]", f"not checked with {dec.name!r}: {why}")

    def space_ok() -> str:
        space = selector.search_space(per_dec[0][1])
        require(isinstance(space, dict), f"search_space() must return a dict, got {type(space).__name__}")
        for k, d in space.items():
            require(isinstance(k, str) and bool(k), f"search-space names must be non-empty strings, got {k!r}")
            require(isinstance(d, BaseDistribution), f"search_space()[{k!r}] must be an Optuna distribution, got {type(d).__name__}")
        for values in space_corners(space):
            selector.validate_params(values)
        return f"{sorted(space)}"

    def defaults_ok() -> str:
        d = selector.defaults()
        require(isinstance(d, dict), f"defaults() must return a dict, got {type(d).__name__}")
        require_json(d, "defaults()")
        full = selector.validate_params({})
        require(isinstance(full, dict), "validate_params({}) must return a dict")
        require(selector.validate_params(full) == full, "validate_params is not idempotent on its own output")
        return f"{d}"

    with seeded(seed):
        checks.run("search_space", space_ok)
        checks.run("defaults", defaults_ok)
        for dec, layers in per_dec:
            suffix = f" [{dec.name}]" if len(per_dec) > 1 else ""
            if getattr(selector, "needs_rank_matrices", False) and not _has_rank_matrices(dec):
                checks.run(f"refuses_without_rank_matrices{suffix}", _refuses(selector, net, dec, layers))
                continue
            checks.run(f"rejects_unknown_params{suffix}", _rejects_unknown(selector, net, dec, layers))
            checks.run(f"ranks_within_bounds{suffix}", _ranks_ok(selector, net, dec, layers, input_shape, params))
    return checks.results


def _has_rank_matrices(dec: Decomposer) -> bool:
    return type(dec).rank_matrices is not Decomposer.rank_matrices


def _refuses(selector: RankSelector, net: nn.Module, dec: Decomposer, layers: Sequence[Any]) -> Callable[[], str]:
    def run() -> str:
        la = layers[0]
        try:
            got = selector.select(net.get_submodule(la.name), dec, cache=SpectralCache(), name=la.name,
                                  **selector.validate_params({}))
        except ConfigError as exc:
            return f"ConfigError: {exc}"
        raise CheckFailed(
            f"needs_rank_matrices is set but select() on {dec.name!r} (no rank_matrices) returned "
            f"{got!r}; raise ConfigError, or set needs_rank_matrices = False"
        )

    return run


def _rejects_unknown(selector: RankSelector, net: nn.Module, dec: Decomposer, layers: Sequence[Any]) -> Callable[[], str]:
    def run() -> str:
        try:
            selector.validate_params({UNKNOWN_PARAM: 1})
        except ConfigError as exc:
            require(UNKNOWN_PARAM in str(exc), f"the error does not name the unknown parameter: {exc}")
        else:
            raise CheckFailed(f"validate_params accepted an unknown parameter {UNKNOWN_PARAM!r}")
        la = layers[0]
        try:
            selector.select(net.get_submodule(la.name), dec, name=la.name, **{**selector.validate_params({}), UNKNOWN_PARAM: 1})
        except (ConfigError, TypeError):
            return "validate_params and select reject it"
        raise CheckFailed(f"select() accepted (dropped) an unknown parameter {UNKNOWN_PARAM!r}")

    return run


def _ranks_ok(
    selector: RankSelector,
    net: nn.Module,
    dec: Decomposer,
    layers: Sequence[Any],
    input_shape: Sequence[int],
    params: Sequence[Mapping[str, Any]] | None,
) -> Callable[[], str]:
    def in_bounds() -> str:
        space = selector.search_space(layers)
        if not all(isinstance(d, BaseDistribution) for d in space.values()):
            space = {}  # an invalid space fails its own check; try the defaults here
        sets = [dict(p) for p in params] if params is not None else [{}, *space_corners(space)]
        tried = 0
        for raw in sets:
            full = selector.validate_params(raw)
            for la in layers:
                module = net.get_submodule(la.name)
                r1 = selector.select(module, dec, cache=SpectralCache(), name=la.name, **full)
                r2 = selector.select(module, dec, cache=SpectralCache(), name=la.name, **full)
                _in_bounds(dec, module, r1, f"select({la.name}) with {raw}")
                require(tuple(r1) == tuple(r2), f"select({la.name}) with {raw} is not deterministic: {r1} then {r2}")
            choices = selector.select_layers(
                net, layers, {la.name: dec for la in layers}, cache=SpectralCache(),
                input_shape=tuple(input_shape), **full,
            )
            require(len(choices) == len(layers), f"select_layers returned {len(choices)} choices for {len(layers)} layers")
            for choice in choices:
                if choice.ranks is not None:
                    _in_bounds(dec, net.get_submodule(choice.name), choice.ranks, f"select_layers({choice.name}) with {raw}")
            tried += 1
        return f"{tried} parameter set(s) on {len(layers)} layer(s) with {dec.name!r}"

    def run() -> str:
        # corners of a space may be unreachable on a tiny model (a budget below the
        # smallest ranks): selectors warn about that, which is not what is checked here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return in_bounds()

    return run


def _in_bounds(dec: Decomposer, module: nn.Module, ranks: Any, where: str) -> None:
    require(isinstance(ranks, tuple), f"{where} must return a tuple, got {type(ranks).__name__}")
    top = dec.max_ranks(module)
    require(len(ranks) == len(top), f"{where} gave {len(ranks)} ranks, {dec.name!r} needs {len(top)}")
    for r, hi in zip(ranks, top):
        require(
            isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= hi,
            f"{where} gave ranks {ranks}, outside [1, {list(top)}]",
        )


def assert_rank_selector(
    selector: RankSelector, decomposer: Decomposer | Sequence[Decomposer] | None = None, **kwargs: Any
) -> None:
    """:func:`check_rank_selector`, raising one AssertionError that lists every failed check."""
    raise_on_failures(
        f"rank selector {getattr(selector, 'name', selector)!r}",
        check_rank_selector(selector, decomposer, **kwargs),
    )
