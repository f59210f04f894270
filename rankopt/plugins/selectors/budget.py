"""The global budget allocator: per-layer ranks that meet a model-wide params/FLOPs target."""

from __future__ import annotations

import heapq
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from optuna.distributions import BaseDistribution, FloatDistribution
from pydantic import Field

from rankopt.compression.accounting import count_flops
from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.contract.decomposer import Decomposer
from rankopt.plugins.selectors._spectra import (
    RELATIVE_TOLERANCE,
    SpectralRankSelector,
    layer_spectra,
    tail_fractions,
)
from rankopt.contract.selector import CheckedRankSelector, LayerChoice, SelectorParams
from rankopt.core.records import RankSelectorInfo
from rankopt.compression.selection import cost_increase_reason, layer_costs
from rankopt.compression.spectral import SpectralCache
from rankopt.compression.surgery import COMPRESSIBLE_TYPES, LayerInfo, find_layers

__all__ = ["BudgetRankSelector", "BudgetParams", "LayerOption"]


class BudgetParams(SelectorParams):
    """``target`` in (0, 1]: the fraction of the cost to keep; ``measure``: ``"params"``
    or ``"flops"``; ``scope``: ``"model"`` (the whole model's cost, default) or
    ``"layers"`` (the considered layers' cost only); ``method``: ``"greedy"`` (most
    energy kept) or ``"minmax"`` (smallest worst per-layer error, as ALDS);
    ``min_rank``: the floor of every rank."""

    target: float = Field(0.5, gt=0.0, le=1.0)
    measure: Literal["params", "flops"] = "params"
    scope: Literal["model", "layers"] = "model"
    method: Literal["greedy", "minmax"] = "greedy"
    min_rank: int = Field(1, ge=1)


@dataclass(frozen=True)
class LayerOption:
    """One candidate for a layer: its ranks (None: left full), cost and discarded energy."""

    ranks: tuple[int, ...] | None
    cost: int
    loss: float


def _layer_options(
    module: nn.Module,
    decomposer: Decomposer,
    layer: LayerInfo,
    options: Mapping[str, Any],
    cache: SpectralCache | None,
    measure: str,
    floor: int,
) -> tuple[int, list[LayerOption]]:
    """The original cost and the Pareto-efficient options of one layer, cheapest first.

    Candidates are the energy rule at every threshold: all rank matrices discard at
    most the same fraction t of their squared energy, for every t where a rank
    changes. The loss of a candidate is the sum of the discarded fractions (the
    HOSVD / TT-SVD bound on the squared relative error).
    """
    spectra = layer_spectra(module, decomposer, cache, options)
    tails = [tail_fractions(sp.singular_values) for sp in spectra]
    levels = np.unique(np.concatenate(tails))
    # per matrix, the smallest rank r with tail[r] <= level (tails are non-increasing)
    matrix_ranks = np.stack(
        [np.searchsorted(-t, -(levels + RELATIVE_TOLERANCE), side="left") for t in tails], axis=1
    )
    matrix_ranks = np.unique(matrix_ranks, axis=0)
    best: dict[tuple[int, ...], float] = {}
    for row in matrix_ranks:
        ranks = SpectralRankSelector.finish(module, decomposer, [int(r) for r in row], options, floor)
        used = ranks if len(ranks) == len(tails) else tuple(int(r) for r in row)
        loss = float(sum(t[min(r, t.size - 1)] for t, r in zip(tails, used)))
        if loss < best.get(ranks, np.inf):
            best[ranks] = loss
    hw = layer.input_hw
    if measure == "flops" and hw is None and isinstance(module, nn.Conv2d):
        raise ConfigError(
            f"rank selector 'budget' with measure='flops' needs the input size of layer "
            f"{layer.name!r}; find the layers with rankopt.find_layers(model, input_shape)"
        )
    original_cost = None
    candidates: list[LayerOption] = []
    for ranks, loss in best.items():
        new, original, flops_known = layer_costs(decomposer, module, ranks, hw, options)
        original_cost = original
        if cost_increase_reason(decomposer.name, ranks, new, original, flops_known) is None:
            candidates.append(LayerOption(ranks, new.flops if measure == "flops" else new.params, loss))
    if original_cost is None:  # no rank matrices at all
        _, original_cost, _ = layer_costs(decomposer, module, decomposer.max_ranks(module, options or None), hw, options)
    full = original_cost.flops if measure == "flops" else original_cost.params
    candidates.append(LayerOption(None, full, 0.0))
    # Pareto-efficient options: cheaper ones must lose more energy
    candidates.sort(key=lambda o: (o.cost, o.loss))
    pareto: list[LayerOption] = []
    for opt in candidates:  # cheapest first; a dearer option must lose strictly less
        if not pareto or opt.loss < pareto[-1].loss - 1e-15:
            pareto.append(opt)
    return full, pareto


def _lower_hull(points: Sequence[LayerOption]) -> list[int]:
    """Indices of the lower convex hull of (cost, loss), points sorted by cost ascending."""
    hull: list[int] = []
    for i, p in enumerate(points):
        while len(hull) >= 2:
            a, b = points[hull[-2]], points[hull[-1]]
            # drop b if it lies on or above the segment a -> p
            if (b.cost - a.cost) * (p.loss - a.loss) - (b.loss - a.loss) * (p.cost - a.cost) <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _allocate_greedy(layers: list[list[LayerOption]], budget: float) -> list[int]:
    """Indices into each layer's options: the least discarded energy per unit cost saved.

    Walks every layer's lower convex hull from its most expensive option, always
    taking the step with the smallest loss per cost saved, until the budget is met;
    the last step stops at the option of that layer that just meets it.
    """
    hulls = [_lower_hull(opts) for opts in layers]
    pos = [len(h) - 1 for h in hulls]  # index into hull (its last vertex = most expensive)
    chosen = [h[-1] for h in hulls]
    total = float(sum(opts[c].cost for opts, c in zip(layers, chosen)))
    heap: list[tuple[float, int]] = []

    def push(li: int) -> None:
        if pos[li] > 0:
            cur, nxt = layers[li][hulls[li][pos[li]]], layers[li][hulls[li][pos[li] - 1]]
            heapq.heappush(heap, ((nxt.loss - cur.loss) / max(cur.cost - nxt.cost, 1e-300), li))

    for li in range(len(layers)):
        push(li)
    while total > budget and heap:
        _, li = heapq.heappop(heap)
        opts = layers[li]
        cur = opts[chosen[li]]
        nxt_index = hulls[li][pos[li] - 1]
        saving = cur.cost - opts[nxt_index].cost
        if total - saving <= budget:
            # the largest option (least loss) between the two hull vertices that fits
            limit = cur.cost - (total - budget)
            fit = [i for i in range(nxt_index, chosen[li]) if opts[i].cost <= limit]
            best = max(fit, key=lambda i: opts[i].cost) if fit else nxt_index
            total -= cur.cost - opts[best].cost
            chosen[li] = best
            break
        total -= saving
        chosen[li] = nxt_index
        pos[li] -= 1
        push(li)
    return chosen


def _allocate_minmax(layers: list[list[LayerOption]], budget: float) -> list[int]:
    """Indices into each layer's options: the smallest worst per-layer loss that fits.

    Every layer takes its cheapest option with loss <= eps; eps is the smallest loss
    level that meets the budget (bisection), then layers are raised to their next
    option, worst first, while the budget allows.
    """

    def pick(eps: float) -> list[int]:
        # options are cheapest first with decreasing loss: the first with loss <= eps
        return [next(i for i, o in enumerate(opts) if o.loss <= eps) for opts in layers]

    def cost(ch: list[int]) -> float:
        return float(sum(opts[c].cost for opts, c in zip(layers, ch)))

    levels = np.unique([o.loss for opts in layers for o in opts])
    lo, hi = 0, levels.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(pick(float(levels[mid]))) <= budget:
            hi = mid
        else:
            lo = mid + 1
    chosen = pick(float(levels[lo]))
    total = cost(chosen)
    order = sorted(range(len(layers)), key=lambda li: -layers[li][chosen[li]].loss)
    for li in order:
        opts = layers[li]
        while chosen[li] + 1 < len(opts):
            extra = opts[chosen[li] + 1].cost - opts[chosen[li]].cost
            if total + extra > budget:
                break
            total += extra
            chosen[li] += 1
    return chosen


def _model_total(
    model: nn.Module, layers: Sequence[LayerInfo], measure: str, input_shape: Sequence[int] | None
) -> int:
    if measure == "params":
        return sum(p.numel() for p in model.parameters())
    if input_shape is None:
        input_shape = _infer_input_shape(model, layers)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return count_flops(model, torch.zeros(tuple(input_shape), device=device))


def _infer_input_shape(model: nn.Module, layers: Sequence[LayerInfo]) -> tuple[int, ...]:
    """(1, C, H, W) from the model's first conv when it is a target with a known input size."""
    first = next((n for n, m in model.named_modules() if n and isinstance(m, COMPRESSIBLE_TYPES)), None)
    info = next((lay for lay in layers if lay.name == first), None)
    how = (
        "pass input_shape=(1, C, H, W) to rankopt.compression.selection.select_spec, or use scope='layers'"
    )
    if info is None or info.kind != "conv2d" or info.input_hw is None:
        raise ConfigError(
            f"rank selector 'budget' with measure='flops' and scope='model' needs the model's input "
            f"shape, which cannot be inferred here; {how}"
        )
    shape = (1, info.in_channels, *info.input_hw)
    try:
        seen = {lay.name: lay.input_hw for lay in find_layers(model, shape)}
    except Exception as exc:
        raise ConfigError(
            f"rank selector 'budget' could not infer the model's input shape (tried {shape}: {exc}); {how}"
        ) from None
    if any(seen.get(lay.name) != lay.input_hw for lay in layers if lay.input_hw is not None):
        raise ConfigError(
            f"rank selector 'budget': the inferred input shape {shape} does not reproduce the layers' "
            f"input sizes; {how}"
        )
    return shape


class BudgetRankSelector(CheckedRankSelector):
    """A global allocator: ranks for every layer such that the model keeps ``target`` of
    its parameters (or FLOPs) within 1 %, keeping as much spectral energy as it can.

    Each layer's candidates are the energy rule at every threshold (every rank
    matrix discards at most the same fraction t of its squared energy), plus the
    uncompressed layer; a candidate that would not make the layer smaller is not one.
    A candidate's loss is the sum of its discarded energy fractions, the bound on the
    squared relative error of truncated HOSVD and TT-SVD (normalized per layer, so
    every layer counts alike).

    * ``method="greedy"`` (default): walk all layers' lower convex hulls of loss versus
      cost, always taking the step that loses the least energy per unit of cost
      saved (the classic greedy for separable resource allocation), and end the last
      step on the option that just meets the budget.
    * ``method="minmax"``: minimize the worst per-layer loss, as the ALDS allocator does
      (Liebenwein et al., NeurIPS 2021), by bisection on a common loss level; then spend
      what is left of the budget on the worst layers.

    ``scope="model"`` measures the whole model (layers outside the considered set,
    biases and norms count at their full cost); FLOPs of the whole model need its
    input shape (``select_spec(..., input_shape=...)``; inferred from the first conv
    otherwise). A target below what the smallest ranks reach gives the smallest ranks
    (every option's cheapest), with a warning and the reachable fraction in the
    layers' reasons.
    """

    name = "budget"
    description = "Global allocator: ranks meeting a params/FLOPs target for the whole model"
    Params = BudgetParams
    needs_rank_matrices = True
    fill_default_options = False  # the one-layer allocation passes the caller's options on as given

    def select_checked(
        self, module: nn.Module, decomposer: Decomposer, checked: dict[str, Any], *,
        cache: SpectralCache | None, name: str | None, options: Mapping[str, Any] | None,
    ) -> tuple[int, ...]:
        """The allocation for this one layer (``scope="layers"``): its own target."""
        checked = {**checked, "scope": "layers"}
        if checked["measure"] == "flops":
            raise ConfigError(
                "rank selector 'budget' prices FLOPs from the layers' input sizes; use "
                "rankopt.compression.selection.select_spec with layers from rankopt.find_layers(model, input_shape)"
            )
        holder = nn.Module()
        holder.add_module("layer", module)
        kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        choice = self.select_layers(
            holder, [LayerInfo("layer", kind, 0, 0, (1, 1))], {"layer": decomposer},
            cache=cache, options={"layer": dict(options or {})}, **checked,
        )[0]
        if choice.ranks is None:
            return tuple(decomposer.max_ranks(module, options or None))
        return choice.ranks

    def select_layers(
        self,
        model: nn.Module,
        layers: Sequence[LayerInfo],
        decomposers: Mapping[str, Decomposer],
        *,
        cache: SpectralCache | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        input_shape: Sequence[int] | None = None,
        **params: Any,
    ) -> list[LayerChoice]:
        checked = self.validate_params(params)
        measure, options = checked["measure"], options or {}
        fulls, per_layer = [], []
        for layer in layers:
            module = model.get_submodule(layer.name)
            opts = dict(options.get(layer.name) or {})
            full, opts_list = _layer_options(
                module, decomposers[layer.name], layer, opts, cache, measure, checked["min_rank"]
            )
            fulls.append(full)
            per_layer.append(opts_list)
        considered = sum(fulls)
        total = considered if checked["scope"] == "layers" else _model_total(model, layers, measure, input_shape)
        outside = max(total - considered, 0)
        budget = checked["target"] * total - outside
        smallest = outside + sum(opts[0].cost for opts in per_layer)
        whose = "the model's" if checked["scope"] == "model" else "the target layers'"
        unreachable = ""
        if smallest > checked["target"] * total * (1 + 1e-12):
            # not a bad parameter as such (it depends on the model): do the best possible
            unreachable = (
                f"target={checked['target']:g} of {whose} {measure} cannot be reached: "
                f"the smallest ranks keep {smallest / max(total, 1):.4f} of it"
            )
            warnings.warn(f"rank selector 'budget': {unreachable}; using the smallest ranks", stacklevel=2)
        allocate = _allocate_greedy if checked["method"] == "greedy" else _allocate_minmax
        chosen = allocate(per_layer, budget)
        out = []
        for layer, opts_list, idx in zip(layers, per_layer, chosen):
            opt = opts_list[idx]
            dec = decomposers[layer.name]
            if opt.ranks is None and len(opts_list) == 1:
                reason = f"budget: kept full; no {dec.name} ranks make this layer smaller"
            elif opt.ranks is None:
                reason = (
                    f"budget: kept full; compressing it was not needed to keep "
                    f"{checked['target']:g} of {whose} {measure}"
                )
            else:
                reason = f"budget: discards {opt.loss:.2%} of the spectral energy (sum over modes)"
            if unreachable:
                reason = f"budget: {unreachable}; " + reason[len("budget: "):]
            out.append(LayerChoice(layer.name, dec.name, opt.ranks, reason, dict(options.get(layer.name) or {})))
        return out

    def search_space(self, layers: Sequence[LayerInfo] = (), **options: Any) -> dict[str, BaseDistribution]:
        self._reject_space_options(options, ())
        # down to 1/200 of the cost (beyond a 64x reduction), log scale
        return {"target": FloatDistribution(0.005, 0.9, log=True)}


@hookimpl
def rankopt_rank_selectors() -> list[RankSelectorInfo]:
    return [RankSelectorInfo("budget", BudgetRankSelector, BudgetRankSelector.description)]
