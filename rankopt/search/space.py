"""A trial's search space: strategy, its hyperparameters, rank selector, its parameters,
and the decomposer of each target layer.

The space is define-by-run (the hyperparameters asked depend on the strategy and
selector chosen), so the local backend and Ray Tune's ``OptunaSearch`` (which accepts
a define-by-run function) sample it through the same :meth:`SearchSpace.suggest`.
Flat parameter names, as they appear in the Optuna storage and in ``enqueue``:

* ``strategy`` and ``selector``: the method (asked only when the study lists several);
* ``<strategy>.<hyperparameter>`` and ``<selector>.<parameter>``: searched values;
* ``decomposer.<layer>``: the decomposer of a layer several allowed decomposers support.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from rankopt.config.schema import SPACE_KEY, Choices, Range, StudyConfig, parse_param_value
from rankopt.core.errors import ConfigError
from rankopt.compression.surgery import LayerInfo

__all__ = ["FULL", "SearchSpace", "TrialPlan", "MethodSpace", "suggest_value", "to_distribution"]

# the per-layer choice "leave this layer uncompressed" (targets.allow_full)
FULL = "full"


@dataclass(frozen=True)
class TrialPlan:
    """What one trial runs: the decoded flat parameters plus the study's fixed values."""

    strategy: str
    strategy_params: dict[str, Any]
    selector: str
    selector_params: dict[str, Any]
    decomposers: dict[str, str]  # layer name -> decomposer name; absent layers stay full

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "strategy_params": dict(self.strategy_params),
            "selector": self.selector,
            "selector_params": dict(self.selector_params),
            "decomposers": dict(self.decomposers),
        }


@dataclass
class MethodSpace:
    """The fixed and the searched parameters of one strategy or selector."""

    fixed: dict[str, Any] = field(default_factory=dict)
    searched: dict[str, BaseDistribution] = field(default_factory=dict)


def to_distribution(value: Range | Choices) -> BaseDistribution:
    """The Optuna distribution of a study-file range or choice list."""
    if isinstance(value, Choices):
        return CategoricalDistribution(value.choices)
    if value.is_int:
        return IntDistribution(int(value.low), int(value.high), log=value.log, step=int(value.step or 1))
    return FloatDistribution(float(value.low), float(value.high), log=value.log, step=value.step)


def suggest_value(trial: Any, name: str, dist: BaseDistribution) -> Any:
    """Ask ``trial`` (an Optuna trial, or Ray's wrapper of one) for ``name`` from ``dist``."""
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    raise ConfigError(f"parameter {name!r}: unsupported distribution {type(dist).__name__}")


def _method_space(
    configured: Mapping[str, Any], declared: Mapping[str, BaseDistribution], where: str
) -> MethodSpace:
    space = MethodSpace()
    for key, dist in declared.items():
        if key not in configured:
            space.searched[key] = dist
    for key, raw in configured.items():
        value = parse_param_value(raw, f"{where}.{key}")
        if isinstance(value, (Range, Choices)):
            space.searched[key] = to_distribution(value)
        else:
            space.fixed[key] = value
    return space


class SearchSpace:
    """The search space of a study over the ``targets`` of ``reference``."""

    def __init__(self, config: StudyConfig, reference: nn.Module, targets: Sequence[LayerInfo]) -> None:
        from rankopt.contract.manager import get_registry

        registry = get_registry()
        self.strategies: dict[str, MethodSpace] = {}
        for name, params in config.strategies.items():
            plugin = registry.create("strategies", name)
            self.strategies[name] = _method_space(params, plugin.search_space_for(params), f"strategies.{name}")
        self.selectors: dict[str, MethodSpace] = {}
        for name, params in config.selectors.items():
            plugin = registry.create("rank_selectors", name)
            params = dict(params)
            space_options = params.pop(SPACE_KEY, None) or {}
            self.selectors[name] = _method_space(
                params, plugin.search_space(list(targets), **space_options), f"selectors.{name}"
            )
        shared = sorted(set(self.strategies) & set(self.selectors))
        if shared:
            raise ConfigError(
                f"strategies and selectors share the name(s) {shared}, which would make the "
                "parameter names '<name>.<param>' ambiguous; drop one of them"
            )
        if FULL in config.decomposers:
            raise ConfigError(
                f"decomposers: {FULL!r} names the per-layer 'stay uncompressed' choice of "
                "targets.allow_full, so a decomposer plugin cannot use it; rename the plugin"
            )
        self.layer_options: dict[str, list[str]] = {}
        decomposers = {name: registry.create("decomposers", name) for name in config.decomposers}
        for layer in targets:
            module = reference.get_submodule(layer.name)
            usable = [n for n, d in decomposers.items() if d.supports(module)]
            if usable:
                self.layer_options[layer.name] = usable + ([FULL] if config.targets.allow_full else [])
        if not self.layer_options:
            raise ConfigError(
                f"decomposers: none of {config.decomposers} supports any target layer "
                f"({[t.name for t in targets] or 'no layers matched targets.include/exclude'}); "
                "allow another decomposer or change targets"
            )

    # -- sampling ------------------------------------------------------------------------
    def distributions(self) -> dict[str, BaseDistribution]:
        """Every flat parameter name that can be asked, with its distribution."""
        out: dict[str, BaseDistribution] = {}
        if len(self.strategies) > 1:
            out["strategy"] = CategoricalDistribution(list(self.strategies))
        if len(self.selectors) > 1:
            out["selector"] = CategoricalDistribution(list(self.selectors))
        for group in (self.strategies, self.selectors):
            for name, space in group.items():
                for key, dist in space.searched.items():
                    out[f"{name}.{key}"] = dist
        for layer, options in self.layer_options.items():
            if len(options) > 1:
                out[f"decomposer.{layer}"] = CategoricalDistribution(options)
        return out

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask ``trial`` for one point; returns the flat values asked."""
        values: dict[str, Any] = {}

        def ask(name: str, dist: BaseDistribution) -> Any:
            values[name] = suggest_value(trial, name, dist)
            return values[name]

        if len(self.strategies) > 1:
            ask("strategy", CategoricalDistribution(list(self.strategies)))
        if len(self.selectors) > 1:
            ask("selector", CategoricalDistribution(list(self.selectors)))
        # Every method's parameters are asked in every trial, not only the chosen
        # method's: NSGA-II's crossover covers only parameters present in all trials and
        # samples the others at random, so conditional ones would never be evolved.
        # The trial uses those of its chosen strategy and selector (see plan()).
        for group in (self.strategies, self.selectors):
            for name, space in group.items():
                for key, dist in space.searched.items():
                    ask(f"{name}.{key}", dist)
        for layer, options in self.layer_options.items():
            if len(options) > 1:
                ask(f"decomposer.{layer}", CategoricalDistribution(options))
        return values

    def plan(self, values: Mapping[str, Any]) -> TrialPlan:
        """The trial a point of :meth:`suggest` (or the storage's ``trial.params``) describes."""
        strategy = values.get("strategy", next(iter(self.strategies)))
        selector = values.get("selector", next(iter(self.selectors)))
        for what, name, group in (("strategy", strategy, self.strategies), ("selector", selector, self.selectors)):
            if name not in group:
                raise ConfigError(f"{what} {name!r} is not in this study; it has {list(group)}")

        def params(name: str, space: MethodSpace) -> dict[str, Any]:
            out = dict(space.fixed)
            for key in space.searched:
                if f"{name}.{key}" in values:
                    out[key] = values[f"{name}.{key}"]
            return out

        chosen = {
            layer: values.get(f"decomposer.{layer}", options[0])
            for layer, options in self.layer_options.items()
        }
        decomposers = {layer: name for layer, name in chosen.items() if name != FULL}
        return TrialPlan(
            strategy=strategy,
            strategy_params=params(strategy, self.strategies[strategy]),
            selector=selector,
            selector_params=params(selector, self.selectors[selector]),
            decomposers=decomposers,
        )

    def check_point(self, point: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Check an ``enqueue`` entry: known names, values inside their distributions."""
        dists = self.distributions()
        out: dict[str, Any] = {}
        for key, raw in point.items():
            value = parse_param_value(raw, f"{where}.{key}")
            if key not in dists:
                head, _, param = key.partition(".")
                group = self.strategies.get(head) or self.selectors.get(head)
                if group is not None and param in group.fixed:
                    raise ConfigError(
                        f"{where}.{key}: {param!r} is fixed at {group.fixed[param]!r} in the "
                        "study file, so it cannot be enqueued; make it a range or drop it here"
                    )
                raise ConfigError(
                    f"{where}.{key}: not a searched parameter of this study; searched "
                    f"parameters are {sorted(dists) or '(none)'}"
                )
            dist = dists[key]
            ok = (
                value in dist.choices
                if isinstance(dist, CategoricalDistribution)
                else isinstance(value, (int, float))
                and not isinstance(value, bool)
                and dist.low <= value <= dist.high  # type: ignore[attr-defined]
            )
            if not ok:
                allowed = (
                    f"one of {list(dist.choices)}"
                    if isinstance(dist, CategoricalDistribution)
                    else f"in [{dist.low}, {dist.high}]"  # type: ignore[attr-defined]
                )
                raise ConfigError(f"{where}.{key}: {value!r} is not allowed; it must be {allowed}")
            out[key] = value
        return out
