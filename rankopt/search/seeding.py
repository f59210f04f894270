"""Seeding a search with the one-shot proposals users run by hand today.

With ``seed_proposals: K`` (or ``true``, the default, meaning :data:`DEFAULT_PROPOSALS`) a study
enqueues, before the sampler proposes anything, for every rank selector of the study:

- its default parameters (``vbmf``: plain VBMF; ``energy``: p = 0.95; ``budget``:
  half the cost), when they lie in the study's search space;
- ``K`` points spread evenly over its searched parameters, every parameter at the
  same relative position ``(i + 0.5) / K`` of its range (on a log scale for log
  ranges): an energy-threshold sweep, one rank fraction for all layers (with
  ``per_layer: true`` every layer gets the same fraction), a budget sweep.

With the ``fixed`` selector searched per layer (``space: {per_layer: true}``), a
uniform rate sweep follows (:data:`UNIFORM_RATES`: every layer's parameters cut by
4, 8, ..., 64x, the classifier left full), the points users sweep by hand and the
extremes that spread points inside a log range never reach. When the study also has
the ``vbmf`` selector, the VBMF sweep follows once the reference is trained
(:func:`anchored_proposals`): VBMF's per-layer allocation cut a further 1.5, 2 and 3x
(:data:`SHRINK_RATES`), the classifier cut with the rest and what that frees given back
to the other layers. A uniform cut treats a 25k-param conv like a 400k-param linear;
VBMF keeps the cheap, sensitive layers richer, and on LeNet-5 at about 17k params its
shape fine-tuned a point more accurate than the uniform sweep's.

The rest of each point is the same for all of them: the first strategy of the study
with its default hyperparameters (a searched one outside its range takes the middle
of the range), and every layer's first decomposer in the study's ``decomposers``
order (list the one you would use by hand first). The sampler then starts from a
first generation that already holds these fronts, instead of from random points.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from rankopt.search.space import SearchSpace

__all__ = ["DEFAULT_PROPOSALS", "SHRINK_RATES", "UNIFORM_RATES", "anchored_proposals", "fraction_steps",
           "proposal_points", "rebalanced_caps", "spread_value", "strategy_point", "uniform_proposals", "uniform_rate_point"]

DEFAULT_PROPOSALS = 3
# the uniform sweep's per-layer parameter-reduction rates (issue 18: down to 64x)
UNIFORM_RATES = (4.0, 8.0, 16.0, 32.0, 64.0)
# the VBMF sweep's further cuts of VBMF's per-layer allocation
SHRINK_RATES = (1.5, 2.0, 3.0)


def spread_value(dist: BaseDistribution, position: float) -> Any:
    """The value at relative ``position`` in [0, 1] of ``dist`` (log scale when ``log``)."""
    if isinstance(dist, CategoricalDistribution):
        choices = list(dist.choices)
        return choices[min(len(choices) - 1, int(position * len(choices)))]
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        low, high = float(dist.low), float(dist.high)
        if dist.log:
            value = math.exp(math.log(low) + position * (math.log(high) - math.log(low)))
        else:
            value = low + position * (high - low)
        step = dist.step
        if step is not None:
            value = low + round((value - low) / float(step)) * float(step)
        value = min(high, max(low, value))
        if isinstance(dist, IntDistribution):
            return int(round(value))
        return round(value, 6)
    raise TypeError(f"unsupported distribution {type(dist).__name__}")


def _inside(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return float(dist.low) <= float(value) <= float(dist.high)  # type: ignore[attr-defined]


def _defaults_of(family: str, name: str) -> Mapping[str, Any]:
    from rankopt.contract.manager import get_registry

    return get_registry().create(family, name).defaults()


def strategy_point(space: SearchSpace) -> dict[str, Any]:
    """The strategy part of a seed point: the study's first strategy with its default
    hyperparameters (a searched one outside its range takes the middle of the range)."""
    out: dict[str, Any] = {}
    strategy = next(iter(space.strategies))
    if "strategy" in space.distributions():
        out["strategy"] = strategy
    defaults = _defaults_of("strategies", strategy)
    for key, dist in space.strategies[strategy].searched.items():
        value = defaults.get(key)
        out[f"{strategy}.{key}"] = value if _inside(dist, value) else spread_value(dist, 0.5)
    return out


def proposal_points(space: SearchSpace, per_selector: int = DEFAULT_PROPOSALS) -> list[dict[str, Any]]:
    """The seed points (flat parameter names, as ``enqueue`` takes them) for ``space``.

    Every point lies inside the study's distributions; duplicates are dropped.
    """
    if per_selector < 0:
        raise ValueError(f"per_selector must be >= 0, got {per_selector}")
    dists = space.distributions()
    common = strategy_point(space)
    for layer, options in space.layer_options.items():
        if f"decomposer.{layer}" in dists:
            common[f"decomposer.{layer}"] = options[0]

    points: list[dict[str, Any]] = []
    for selector, method in space.selectors.items():
        head = {"selector": selector} if "selector" in dists else {}
        searched = method.searched
        sel_defaults = _defaults_of("rank_selectors", selector)
        candidates: list[dict[str, Any]] = []
        if all(_inside(d, sel_defaults.get(k)) for k, d in searched.items()):
            candidates.append({f"{selector}.{k}": sel_defaults[k] for k in searched})
        if searched:
            for i in range(per_selector):
                position = (i + 0.5) / per_selector
                candidates.append({f"{selector}.{k}": spread_value(d, position) for k, d in searched.items()})
        for candidate in candidates:
            point = {**head, **candidate, **common}
            if point not in points:
                points.append(point)
    return points


def uniform_proposals(
    space: SearchSpace, reference: Any, rates: Any = UNIFORM_RATES
) -> list[dict[str, Any]]:
    """The uniform rate sweep as seed points (flat names, as ``enqueue`` takes them), or
    ``[]`` when the study does not search the ``fixed`` selector per layer.

    The last target layer stays full when it is a ``Linear`` (the classifier): at 8x and
    beyond a 10-class classifier would be cut to rank 1, which no fine-tuning recovers
    (``benchmarks/RESULTS.md``, "Front quality (mnist)": ``uniform`` vs ``uniform_head``).
    Each point carries the study's first strategy with its defaults (:func:`strategy_point`).
    """
    from rankopt.plugins.selectors.fixed import PER_LAYER_PREFIX

    if not _per_layer_fixed(space):
        return []
    classifier = _classifier(space, reference)

    def point_at(rate: float) -> dict[str, Any]:
        point = uniform_rate_point(space, reference, rate)
        if classifier is not None:
            point[f"fixed.{PER_LAYER_PREFIX}{classifier}"] = 1.0
        return point

    return _sweep(space, rates, point_at)


def _per_layer_fixed(space: SearchSpace) -> bool:
    from rankopt.plugins.selectors.fixed import PER_LAYER_PREFIX

    fixed = space.selectors.get("fixed")
    return (fixed is not None and bool(space.layer_options)
            and any(k.startswith(PER_LAYER_PREFIX) for k in fixed.searched))


def _classifier(space: SearchSpace, reference: Any) -> str | None:
    """The last target layer when it is a ``Linear`` (the classifier), else None."""
    import torch.nn as nn

    last = list(space.layer_options)[-1]
    return last if isinstance(reference.get_submodule(last), nn.Linear) else None


def _sweep(space: SearchSpace, rates: Any, point_at: Callable[[float], dict[str, Any]]) -> list[dict[str, Any]]:
    """``point_at(rate)``'s fractions for each rate as seed points: the ``fixed`` selector
    and the study's first strategy added, duplicates once."""
    head = {"selector": "fixed"} if "selector" in space.distributions() else {}
    common = strategy_point(space)
    points: list[dict[str, Any]] = []
    for rate in rates:
        point = {**head, **point_at(float(rate)), **common}
        if point not in points:
            points.append(point)
    return points


def anchored_proposals(
    space: SearchSpace,
    reference: Any,
    targets: Any,
    *,
    rates: Any = SHRINK_RATES,
    cache: Any = None,
    min_in_channels: int = 1,
    min_saving: float = 0.0,
) -> list[dict[str, Any]]:
    """The VBMF sweep as seed points, or ``[]`` unless the study searches both ``vbmf``
    and the ``fixed`` selector per layer.

    Its anchor is the ranks plain VBMF gives on the trained ``reference`` (each layer's
    first decomposer; a layer VBMF leaves full counts its own params). At each of
    ``rates`` the point has the params of VBMF's allocation with every layer but the
    classifier (a last ``Linear`` target) cut by that rate, spent as follows: the
    classifier is cut by the rate too, and what that frees goes back to the other
    layers, each cut by one common smaller rate, the rounding remainder then spent one
    rank step at a time, cheapest step first (:func:`rebalanced_caps`).

    Why: a 10-class classifier at rank 6 of 10 loses little, while at these sizes its
    500x10 weights are a third of the model. On LeNet-5 (``benchmarks/RESULTS.md``,
    "Training-seed spread") the 1.5x point with the classifier kept full fine-tunes
    to 0.9684 +- 0.0015, the same params spent this way to 0.9732 +- 0.0004; at 2x and
    3x the rebalanced points are 0.6 and 2.9 points more accurate with fewer params.
    """
    from rankopt.contract.manager import get_registry
    from rankopt.compression.selection import select_spec

    if "vbmf" not in space.selectors or not _per_layer_fixed(space):
        return []
    registry = get_registry()
    first = {layer: options[0] for layer, options in space.layer_options.items()}
    considered = [t for t in targets if t.name in first]
    spec, _ = select_spec(reference, considered, first, "vbmf", {}, cache=cache,
                          min_in_channels=min_in_channels, min_saving=min_saving)
    steps: dict[str, list[tuple[float, int]]] = {}
    anchor: dict[str, float] = {}
    for layer, name in first.items():
        module = reference.get_submodule(layer)
        dec = registry.create("decomposers", name)
        steps[layer] = fraction_steps(dec, module, min_saving)
        entry = spec.get(layer)
        anchor[layer] = float(sum(p.numel() for p in module.parameters())) if entry is None else float(
            dec.cost(module, entry["ranks"], input_hw=(1, 1)).params)
    classifier = _classifier(space, reference)
    # layers the study keeps dense (thin stems) take no part in the rebalancing
    kept = {t.name for t in considered if t.in_channels < min_in_channels}

    def point_at(rate: float) -> dict[str, Any]:
        caps = {layer: cap / rate for layer, cap in anchor.items()}
        if classifier is not None and classifier not in kept:
            moved = [layer for layer in anchor if layer not in kept]
            caps.update(rebalanced_caps({k: steps[k] for k in moved}, {k: anchor[k] for k in moved},
                                        classifier, rate))
        return uniform_rate_point(space, reference, rate, allowed=caps)

    return _sweep(space, rates, point_at)


def fraction_steps(dec: Any, module: Any, min_saving: float = 0.0) -> list[tuple[float, int]]:
    """``(fraction, params)`` at every fraction of the ``fixed`` selector at which some of
    ``module``'s ranks change (``ceil(fraction * largest)``), smallest first; a step whose
    factorized form saves under ``min_saving`` of the layer counts the layer's own params
    (the study leaves it dense). The last step is fraction 1.0."""
    largest = dec.max_ranks(module)
    full = int(sum(p.numel() for p in module.parameters()))
    out: list[tuple[float, int]] = []
    for f in sorted({k / hi for hi in largest for k in range(1, hi + 1)}):
        ranks = [max(1, math.ceil(f * hi - 1e-9)) for hi in largest]
        # params do not depend on the input size; any (H, W) counts them
        params = int(dec.cost(module, ranks, input_hw=(1, 1)).params)
        out.append((f, full if params > (1.0 - min_saving) * full else params))
    return out


def _step_under(steps: list[tuple[float, int]], cap: float) -> int:
    """The index of the largest step with at most ``cap`` params (0 when none is); the
    steps' params never fall, so a binary search finds it."""
    return max(0, bisect.bisect_right(steps, cap, key=lambda step: step[1]) - 1)


def rebalanced_caps(steps: Mapping[str, list[tuple[float, int]]], anchor: Mapping[str, float],
                    classifier: str, rate: float) -> dict[str, float]:
    """Per-layer param caps of the VBMF sweep's point at ``rate``: the params of
    ``anchor`` (per layer) with every layer but the ``classifier`` cut by ``rate`` (as
    rounded to ``steps``, :func:`fraction_steps`), the classifier cut by ``rate`` too and
    what that frees spread over the other layers, each cut by the smallest common rate in
    [1, ``rate``] that keeps the total; the remainder then goes one step at a time to the
    layer whose next step costs the fewest params."""
    def total(index: Mapping[str, int]) -> int:
        return sum(steps[layer][i][1] for layer, i in index.items())

    others = [layer for layer in anchor if layer != classifier]
    budget = total({layer: _step_under(steps[layer], anchor[layer] / (1.0 if layer == classifier else rate))
                    for layer in anchor})
    head = _step_under(steps[classifier], anchor[classifier] / rate)

    def at(common: float) -> dict[str, int]:
        return {**{layer: _step_under(steps[layer], anchor[layer] / common) for layer in others},
                classifier: head}

    low, high = 1.0, float(rate)  # total(at(high)) <= budget by construction
    for _ in range(40):  # the total falls as the common rate grows
        mid = (low + high) / 2
        low, high = (low, mid) if total(at(mid)) <= budget else (mid, high)
    index = at(high)
    while True:  # spend the rounding remainder, cheapest step first
        grown = [(steps[layer][index[layer] + 1][1] - steps[layer][index[layer]][1], layer)
                 for layer in others if index[layer] + 1 < len(steps[layer])]
        fits = [(cost, layer) for cost, layer in grown if total(index) + cost <= budget]
        if not fits:
            break
        index[min(fits)[1]] += 1
    return {layer: float(steps[layer][i][1]) for layer, i in index.items()}


def uniform_rate_point(
    space: SearchSpace,
    reference: Any,
    rate: float,
    decomposers: Mapping[str, str] | None = None,
    allowed: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The ``fixed`` selector's per-layer fractions (``per_layer: true``) that cut every
    target layer's parameters by ``rate`` (the uniform rate sweep users run by hand), or
    to ``allowed[layer]`` parameters where given.

    Per layer, the largest fraction whose ranks (``ceil(fraction * largest)``, as the
    selector rounds) give at most ``params / rate`` parameters; rank 1 everywhere when
    even that is above it. ``decomposers``: ``{layer: name}`` (default: each layer's
    first decomposer in the study's order).
    """
    from rankopt.contract.manager import get_registry
    from rankopt.plugins.selectors.fixed import MIN_FRACTION, PER_LAYER_PREFIX

    if not rate >= 1:
        raise ValueError(f"rate must be >= 1 (a reduction factor), got {rate!r}")
    if "fixed" not in space.selectors:
        raise ValueError("the study has no 'fixed' selector (with space: {per_layer: true})")
    registry = get_registry()
    point: dict[str, Any] = {}
    for layer, options in space.layer_options.items():
        name = (decomposers or {}).get(layer, options[0])
        dec = registry.create("decomposers", name)
        module = reference.get_submodule(layer)
        cap = (allowed or {}).get(layer, sum(p.numel() for p in module.parameters()) / rate)
        steps = fraction_steps(dec, module)
        best = steps[_step_under(steps, cap)][0]
        point[f"fixed.{PER_LAYER_PREFIX}{layer}"] = min(1.0, max(MIN_FRACTION, best))
        if f"decomposer.{layer}" in space.distributions():
            point[f"decomposer.{layer}"] = name
    return point
