"""Model-wide rank selection: a compression spec from a selector and a decomposer per layer.

::

    from rankopt.compression.selection import select_spec
    layers = rankopt.find_layers(model, (1, 3, 32, 32))
    spec, choices = select_spec(model, layers, {l.name: "tucker2" for l in layers
                                                if l.kind == "conv2d"},
                                "energy", {"p": 0.95})
    small = rankopt.compress(model, spec)

Every selector goes through the same checks here: its parameters are validated
before any work, a layer its decomposer cannot handle stays full, ranks must lie in
``[1, largest]``, and a layer whose factorized form would not be smaller (fewer
parameters, and no more FLOPs where the input size is known) stays full with the
reason in its :class:`~rankopt.LayerChoice`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
from optuna.distributions import BaseDistribution

from rankopt.compression.accounting import Cost, layer_cost
from rankopt.core.errors import ConfigError
from rankopt.contract.decomposer import Decomposer
from rankopt.compression.spectral import SpectralCache
from rankopt.compression.surgery import LayerInfo, Spec, get_submodule
from rankopt.contract.selector import LayerChoice, RankAlignment, RankSelector

__all__ = [
    "select_spec",
    "selector_search_space",
    "resolve_selector",
    "layer_costs",
    "cost_increase_reason",
]


def resolve_selector(selector: str | RankSelector) -> RankSelector:
    """A selector instance from a registered name or an instance."""
    if isinstance(selector, RankSelector):
        return selector
    if isinstance(selector, str):
        from rankopt.contract.manager import get_registry

        return get_registry().create("rank_selectors", selector)  # type: ignore[no-any-return]
    raise ConfigError(
        f"selector must be a rank selector name (see `rankopt plugins`) or a RankSelector, "
        f"got {type(selector).__name__}"
    )


def selector_search_space(
    selector: str | RankSelector, layers: Sequence[LayerInfo], **options: Any
) -> dict[str, BaseDistribution]:
    """The Optuna search space of ``selector``'s parameters for these target layers.

    ``options`` shape the space (e.g. ``per_layer=True`` for ``fixed``); unknown ones fail.
    """
    return resolve_selector(selector).search_space(list(layers), **options)


def _nominal_hw(module: nn.Module) -> tuple[int, int]:
    """An input size valid for ``module``; only for parameter counts (FLOPs are ignored)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        dh, dw = module.dilation
        return (max(32, dh * (kh - 1) + 1), max(32, dw * (kw - 1) + 1))
    return (32, 32)


def layer_costs(
    decomposer: Decomposer,
    module: nn.Module,
    ranks: Sequence[int],
    input_hw: Sequence[int] | None,
    options: Mapping[str, Any] | None = None,
) -> tuple[Cost, Cost, bool]:
    """(factorized cost, original cost, whether FLOPs are known) of one layer at ``ranks``.

    Without an input size a conv's FLOPs are unknown: they are reported as 0 and
    only parameters count.
    """
    flops_known = input_hw is not None or not isinstance(module, nn.Conv2d)
    hw = tuple(input_hw) if input_hw is not None else _nominal_hw(module)
    new = decomposer.cost(module, ranks, hw if isinstance(module, nn.Conv2d) else input_hw, options or None)
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        original = layer_cost(module, hw if isinstance(module, nn.Conv2d) else None)
    else:
        original = Cost(sum(p.numel() for p in module.parameters()), 0)
    if not flops_known:
        new, original = Cost(new.params, 0), Cost(original.params, 0)
    return new, original, flops_known


def cost_increase_reason(
    decomposer: str, ranks: Sequence[int], new: Cost, original: Cost, flops_known: bool,
    min_saving: float = 0.0,
) -> str | None:
    """Why a factorized layer is not worth it (None when it is smaller).

    Compressed means strictly fewer parameters and, where FLOPs are known, no more FLOPs;
    with ``min_saving`` s > 0, at most ``(1 - s)`` of the original's parameters and (where
    known) FLOPs: a factorization that saves a few percent still runs two or three ops
    instead of one, and measured slower than the dense layer in every runtime
    (``benchmarks/RESULTS.md``, realized speed).
    """
    if new.params >= original.params:
        return (
            f"{decomposer} at ranks {tuple(ranks)} would have {new.params:,} parameters, not fewer "
            f"than the original {original.params:,}; the layer stays uncompressed"
        )
    if flops_known and new.flops > original.flops:
        return (
            f"{decomposer} at ranks {tuple(ranks)} would need {new.flops:,} FLOPs, more than the "
            f"original {original.flops:,}; the layer stays uncompressed"
        )
    if min_saving > 0:
        for what, a, b in (("parameters", new.params, original.params),
                           ("FLOPs", new.flops, original.flops if flops_known else 0)):
            if b and a > (1.0 - min_saving) * b:
                return (
                    f"{decomposer} at ranks {tuple(ranks)} would save {1 - a / b:.1%} of the layer's "
                    f"{what} ({a:,} of {b:,}), less than targets.min_saving={min_saving:g}; the "
                    "layer stays uncompressed (an extra op for almost nothing; set "
                    "targets.min_saving: 0 to compress it anyway)"
                )
    return None


def _resolve_decomposers(
    model: nn.Module, layers: Sequence[LayerInfo], decomposers: Mapping[str, str]
) -> tuple[list[LayerInfo], dict[str, Decomposer]]:
    from rankopt.contract.manager import get_registry

    if not isinstance(decomposers, Mapping):
        raise ConfigError(
            "decomposers must be a mapping {layer name: decomposer name}, "
            f"got {type(decomposers).__name__}"
        )
    by_name = {layer.name: layer for layer in layers}
    unknown = [n for n in decomposers if n not in by_name]
    if unknown:
        raise ConfigError(
            f"decomposers names layer(s) {unknown} that are not among the target layers; "
            f"the targets are {sorted(by_name)}"
        )
    registry = get_registry()
    instances: dict[str, Decomposer] = {}
    per_layer: dict[str, Decomposer] = {}
    for name, dec_name in decomposers.items():
        if isinstance(dec_name, Decomposer):
            per_layer[name] = dec_name
            continue
        if dec_name not in instances:
            instances[dec_name] = registry.create("decomposers", dec_name)
        per_layer[name] = instances[dec_name]
    considered = [layer for layer in layers if layer.name in decomposers]
    for layer in considered:
        get_submodule(model, layer.name)  # a clear error for a stale layer list
    return considered, per_layer


def select_spec(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    decomposers: Mapping[str, str],
    selector: str | RankSelector,
    params: Mapping[str, Any],
    *,
    cache: SpectralCache | None = None,
    input_shape: Sequence[int] | None = None,
    rank_multiple: int | RankAlignment = 1,
    min_in_channels: int = 1,
    min_saving: float = 0.0,
) -> tuple[Spec, list[LayerChoice]]:
    """A compression spec for ``model`` and the decision for every considered layer.

    Args:
        model: the model whose current weights are read.
        layers: its target layers (from :func:`rankopt.find_layers`, with input sizes
            for FLOPs).
        decomposers: layer qualified name -> decomposer name, for the layers to
            consider (the others are ignored).
        selector: a rank selector name or instance; ``params`` its parameters
            (validated before any work; unknown names fail).
        cache: the spectral cache (default: :func:`rankopt.compression.spectral.get_default_cache`).
        input_shape: the model's input, batch included; global selectors that price
            FLOPs of the whole model (``budget``) need it, the others ignore it.
        rank_multiple: every selected rank is rounded to a multiple of this (or the
            layer's largest rank), see :func:`~rankopt.contract.selector.round_ranks`;
            a :class:`~rankopt.contract.selector.RankAlignment` (what a study's
            ``rank_multiple: auto`` resolves to) rounds only the layers large enough.
        min_in_channels: layers with fewer input channels stay full (a 3-channel stem
            saves almost nothing and costs an extra op); 1 considers every layer.
            Studies default to 4.
        min_saving: a layer whose factorized form keeps more than ``1 - min_saving`` of
            its parameters or FLOPs stays full (see :func:`cost_increase_reason`);
            studies default to 0.1 (``targets.min_saving``), this function to 0.

    Returns:
        ``(spec, choices)``: the spec ``{name: {"decomposer", "ranks", ["options"]}}`` of
        the layers that get compressed, and a :class:`~rankopt.LayerChoice` for every
        considered layer, in ``layers`` order (ranks None and a reason for those left
        full).
    """
    alignment = rank_multiple if isinstance(rank_multiple, RankAlignment) else RankAlignment(rank_multiple)
    for what, value in (("rank_multiple", alignment.multiple), ("min_in_channels", min_in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")
    if isinstance(min_saving, bool) or not isinstance(min_saving, (int, float)) or not 0 <= min_saving < 1:
        raise ConfigError(f"min_saving must be a number in [0, 1), got {min_saving!r}")
    sel = resolve_selector(selector)
    checked = sel.validate_params(params if params is not None else {})
    from rankopt.compression.attention import needs_modularizing
    from rankopt.compression.surgery import modularized_copy

    if needs_modularizing(model):  # attention projections as modules, named as find_layers lists them
        model = modularized_copy(model)
    considered, per_layer = _resolve_decomposers(model, layers, decomposers)

    reasons: dict[str, str] = {}
    options: dict[str, dict[str, Any]] = {}
    supported: list[LayerInfo] = []
    for layer in considered:
        dec = per_layer[layer.name]
        module = model.get_submodule(layer.name)
        why = dec.unsupported_reason(module)
        if layer.in_channels < min_in_channels:
            reasons[layer.name] = (
                f"{layer.in_channels} input channel(s), fewer than min_in_channels={min_in_channels}: "
                "a stem this thin saves almost nothing and costs an extra op; set "
                "targets.dense_input_channels: 0 in the study to compress it"
            )
            continue
        if why is not None:
            reasons[layer.name] = f"decomposer {dec.name!r} cannot decompose it: {why}"
            continue
        options[layer.name] = dict(dec.default_options(module) or {})
        supported.append(layer)

    raw = sel.select_layers(
        model, supported, {lay.name: per_layer[lay.name] for lay in supported},
        cache=cache, options=options, input_shape=input_shape, **checked,
    ) if supported else []
    raw_by_name = {c.name: c for c in raw}
    missing = [lay.name for lay in supported if lay.name not in raw_by_name]
    if missing:
        raise ConfigError(
            f"rank selector {sel.name!r} returned no decision for layer(s) {missing}; "
            "select_layers must return one LayerChoice per layer"
        )

    spec: Spec = {}
    choices: list[LayerChoice] = []
    for layer in considered:
        dec = per_layer[layer.name]
        if layer.name in reasons:
            choices.append(LayerChoice(layer.name, dec.name, None, reasons[layer.name]))
            continue
        module = model.get_submodule(layer.name)
        choice = raw_by_name[layer.name]
        opts = dict(choice.options or options.get(layer.name) or {})
        if choice.ranks is None:
            choices.append(LayerChoice(layer.name, dec.name, None, choice.reason or "left full by the selector", opts))
            continue
        ranks = tuple(choice.ranks)
        ranks = alignment.apply(ranks, dec.max_ranks(module, opts or None))
        ranks = dec.check_ranks(module, ranks, name=layer.name, options=opts or None)
        new, original, flops_known = layer_costs(dec, module, ranks, layer.input_hw, opts)
        why = cost_increase_reason(dec.name, ranks, new, original, flops_known, min_saving)
        if why is not None:
            choices.append(LayerChoice(layer.name, dec.name, None, why, opts, new, original))
            continue
        entry: dict[str, Any] = {"decomposer": dec.name, "ranks": list(ranks)}
        if opts:
            entry["options"] = opts
        spec[layer.name] = entry
        choices.append(LayerChoice(layer.name, dec.name, ranks, choice.reason, opts, new, original))
    return spec, choices
