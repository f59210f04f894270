"""The rank ladders the refining sampler moves on (see :mod:`rankopt.search.refining`).

For every layer the study searches per layer (the ``fixed`` selector with
``space: {per_layer: true}``) and every decomposer it may take, a *ladder*: the distinct
ranks the ``fixed`` selector can give that layer (``ceil(fraction * largest)`` for every
fraction, rounded as the study's ``rank_multiple`` rounds them), cheapest first, each
with its params, its FLOPs and the share of the layer's energy it discards, and as its
top the layer left dense. Steps that would save less than ``targets.min_saving`` are the
dense step: the study leaves such layers dense, so they are one model.

The discarded energy is the budget selector's measure (the sum over the decomposer's
rank matrices of the squared singular values cut, as a share): read from the whitened
spectra when the study calibrates (``calibration.spectra: output``), so it is the share
of the layer's *output* energy on real inputs that a step gives up.

A ladder holds only numbers, so the plan pickles (Ray Tune copies its searcher).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn as nn
from optuna.distributions import BaseDistribution

from rankopt.compression.selection import layer_costs
from rankopt.compression.surgery import LayerInfo
from rankopt.contract.selector import RankAlignment, ceil_fraction
from rankopt.core.errors import ConfigError
from rankopt.search.space import FULL, SearchSpace

__all__ = ["LadderStep", "RefinePlan", "build_refine_plan", "layer_ladder"]


@dataclass(frozen=True)
class LadderStep:
    """One rung of a layer's ladder: the ``fixed`` fraction that gives it, its ranks
    (``None``: the layer stays dense), its cost and the energy share it discards."""

    fraction: float
    ranks: tuple[int, ...] | None
    params: int
    flops: int
    loss: float


@dataclass(frozen=True)
class RefinePlan:
    """What the refining sampler needs to know about a study's space, as plain data.

    ``ladders[layer][decomposer]``: the layer's steps, cheapest first, dense last;
    ``fraction_keys[layer]`` / ``decomposer_keys[layer]``: the flat parameter names that
    set them; ``head``: ``{"selector": "fixed"}`` when the study searches the selector;
    ``distributions``: every flat parameter of the space (as the trials ask them).
    """

    ladders: dict[str, dict[str, tuple[LadderStep, ...]]]
    # every factorized ranks a fraction can give (ladder or not) and the largest ranks:
    # what a trial asked for by fractions trains, for telling repeats
    saving: dict[str, dict[str, frozenset[tuple[int, ...]]]]
    largest: dict[str, dict[str, tuple[int, ...]]]
    alignment: RankAlignment
    fraction_keys: dict[str, str]
    decomposer_keys: dict[str, str]
    head: dict[str, str]
    distributions: dict[str, BaseDistribution]
    objectives: tuple[str, ...] = field(default=())

    @property
    def layers(self) -> list[str]:
        return list(self.ladders)


def _tails(module: nn.Module, dec: Any, cache: Any, options: Mapping[str, Any] | None) -> list[np.ndarray] | None:
    from rankopt.plugins.selectors._spectra import layer_spectra, tail_fractions

    try:
        return [tail_fractions(sp.singular_values) for sp in layer_spectra(module, dec, cache, options)]
    except (ConfigError, NotImplementedError):
        return None  # no rank matrices: steps are then ranked by their cost alone


def _loss(tails: list[np.ndarray] | None, ranks: Sequence[int], params: int, full: int) -> float:
    if tails is None:  # a decomposer without spectra: the share of params cut stands in
        return max(0.0, 1.0 - params / full) if full else 0.0
    used = list(ranks) if len(ranks) == len(tails) else [ranks[0]] * len(tails)
    return float(sum(t[min(int(r), t.size - 1)] for t, r in zip(tails, used)))


def layer_ladder(module: nn.Module, dec: Any, layer: LayerInfo, *, cache: Any = None,
                 alignment: RankAlignment = RankAlignment(1), min_saving: float = 0.0) -> tuple[LadderStep, ...]:
    """The ladder of one layer under one decomposer (see the module docstring)."""
    return _ladder(module, dec, layer, cache, alignment, min_saving)[0]


def _ladder(module: nn.Module, dec: Any, layer: LayerInfo, cache: Any, alignment: RankAlignment,
            min_saving: float) -> tuple[tuple[LadderStep, ...], frozenset[tuple[int, ...]]]:
    """The ladder and every ranks the ``fixed`` selector can give that the study factorizes."""
    options = dict(dec.default_options(module) or {}) or None
    largest = [int(h) for h in dec.max_ranks(module, options)]
    tails = _tails(module, dec, cache, options)
    _, original, flops_known = layer_costs(dec, module, largest, layer.input_hw, options)
    steps: list[LadderStep] = []
    seen: set[tuple[int, ...]] = set()
    for f in sorted({k / hi for hi in largest for k in range(1, hi + 1)}):
        ranks = alignment.apply([max(1, ceil_fraction(f, hi)) for hi in largest], largest)
        if ranks in seen:
            continue
        seen.add(ranks)
        new, _, _ = layer_costs(dec, module, ranks, layer.input_hw, options)
        saves = new.params <= (1.0 - min_saving) * original.params and (
            not flops_known or new.flops <= (1.0 - min_saving) * original.flops)
        if not saves:
            continue  # the study leaves it dense: the dense step below is that model
        steps.append(LadderStep(float(f), ranks, int(new.params), int(new.flops),
                                _loss(tails, ranks, int(new.params), int(original.params))))
    steps.append(LadderStep(1.0, None, int(original.params), int(original.flops), 0.0))
    # keep only steps that lose strictly less than every cheaper one (a dearer step that
    # keeps no more energy is never worth a move)
    kept: list[LadderStep] = []
    for step in steps:
        if not kept or step.loss < kept[-1].loss - 1e-15 or step.ranks is None:
            kept.append(step)
    return tuple(kept), frozenset(s.ranks for s in steps if s.ranks is not None)


def build_refine_plan(space: SearchSpace, reference: nn.Module, targets: Sequence[LayerInfo], *,
                      cache: Any = None, alignment: RankAlignment = RankAlignment(1),
                      min_saving: float = 0.0, min_in_channels: int = 1,
                      objectives: Sequence[str] = ()) -> RefinePlan | None:
    """The plan of ``space``, or ``None`` when the study does not search the ``fixed``
    selector per layer (there is then no per-layer rank to move)."""
    from rankopt.contract.manager import get_registry
    from rankopt.plugins.selectors.fixed import PER_LAYER_PREFIX

    fixed = space.selectors.get("fixed")
    if fixed is None:
        return None
    per_layer = {k[len(PER_LAYER_PREFIX):]: f"fixed.{k}" for k in fixed.searched if k.startswith(PER_LAYER_PREFIX)}
    if not per_layer:
        return None
    registry = get_registry()
    infos = {t.name: t for t in targets}
    dists = space.distributions()
    ladders: dict[str, dict[str, tuple[LadderStep, ...]]] = {}
    saving: dict[str, dict[str, frozenset[tuple[int, ...]]]] = {}
    largest: dict[str, dict[str, tuple[int, ...]]] = {}
    decomposer_keys: dict[str, str] = {}
    for layer, options in space.layer_options.items():
        if layer not in per_layer or layer not in infos:
            continue
        module = reference.get_submodule(layer)
        ladders[layer], saving[layer], largest[layer] = {}, {}, {}
        for name in options:
            if name == FULL:
                continue
            dec = registry.create("decomposers", name)
            steps, fits = _ladder(module, dec, infos[layer], cache, alignment, min_saving)
            if infos[layer].in_channels < min_in_channels:  # a thin stem the study keeps dense
                steps, fits = steps[-1:], frozenset()
            ladders[layer][name], saving[layer][name] = steps, fits
            largest[layer][name] = tuple(int(h) for h in dec.max_ranks(module, dict(dec.default_options(module) or {}) or None))
        if f"decomposer.{layer}" in dists:
            decomposer_keys[layer] = f"decomposer.{layer}"
    if not ladders:
        return None
    return RefinePlan(
        ladders=ladders,
        saving=saving,
        largest=largest,
        alignment=alignment,
        fraction_keys={layer: per_layer[layer] for layer in ladders},
        decomposer_keys=decomposer_keys,
        head={"selector": "fixed"} if "selector" in dists else {},
        distributions=dists,
        objectives=tuple(objectives),
    )
