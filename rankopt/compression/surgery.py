"""Model surgery: find compressible layers and swap in factorized modules by name."""

from __future__ import annotations

import copy
import fnmatch
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from rankopt.compression.accounting import Cost, layer_cost
from rankopt.compression.attention import modularize_attention, needs_modularizing, projection_view
from rankopt.core.errors import ConfigError, DecompositionError, UnsupportedModuleError
from rankopt.core.types import LayerInfo, Spec

__all__ = [
    "LayerInfo",
    "find_layers",
    "get_submodule",
    "set_submodule",
    "compress",
    "modularized_copy",
    "normalize_spec",
    "Spec",
]

COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


# the input shape find_layers last probed each model with: compress's default sample input
_PROBED_SHAPES: weakref.WeakKeyDictionary[nn.Module, tuple[int, ...]] = weakref.WeakKeyDictionary()


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``; a MultiheadAttention's input projection (``in_proj``,
    ``q_proj``, ``k_proj``, ``v_proj``, listed by :func:`find_layers`) is given as an
    ``nn.Linear`` sharing its parameters."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        parent_name, _, leaf = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            parent = None
        if isinstance(parent, nn.MultiheadAttention):
            view = projection_view(parent, leaf)
            if view is not None:
                return view
        raise ConfigError(
            f"layer {name!r} is not a submodule of {type(model).__name__}; use a qualified "
            "name as listed by `rankopt inspect` (e.g. 'layer1.0.conv1')"
        ) from None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_layers(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
    types: tuple[type[nn.Module], ...] = COMPRESSIBLE_TYPES,
) -> list[LayerInfo]:
    """The Conv2d and Linear layers of ``model``, in module order, with the input size each sees.

    Attention projections count as Linear layers: ``nn.MultiheadAttention``'s ``in_proj``
    (or ``q_proj``/``k_proj``/``v_proj``) and ``out_proj``, torchvision Swin's ``qkv`` and
    ``proj`` (see :mod:`rankopt.compression.attention`). ``input_shape`` (batch included, e.g.
    ``(1, 3, 32, 32)``) is needed for conv FLOPs; a layer never reached by the forward
    pass is left out (:func:`rankopt.compression.layer_census` says which, and why).
    ``include``/``exclude`` are glob patterns on qualified names.
    """
    original = model
    if needs_modularizing(model):  # list the projections as the compressed model calls them
        model = modularized_copy(model)
    chosen = [
        (n, m)
        for n, m in model.named_modules()
        if n and isinstance(m, types) and _matches(n, include) and not _matches(n, exclude)
    ]
    seen_hw: dict[str, tuple[int, int] | None] = {}
    if input_shape is not None:
        handles = []
        for n, m in chosen:
            def hook(mod: nn.Module, args: tuple[Any, ...], n: str = n) -> None:
                x = args[0]
                seen_hw.setdefault(n, tuple(x.shape[-2:]) if x.dim() == 4 else None)  # type: ignore[arg-type]

            handles.append(m.register_forward_pre_hook(hook))
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else None  # a .double() model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(tuple(input_shape), device=device, dtype=dtype))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        _PROBED_SHAPES[original] = tuple(int(d) for d in input_shape)
    out = []
    for n, m in chosen:
        if input_shape is not None and n not in seen_hw:
            continue
        hw = seen_hw.get(n)
        if isinstance(m, nn.Conv2d):
            info = LayerInfo(
                n, "conv2d", m.in_channels, m.out_channels, tuple(m.kernel_size),  # type: ignore[arg-type]
                tuple(m.stride), m.groups, hw,  # type: ignore[arg-type]
                layer_cost(m, hw) if hw is not None else Cost(sum(p.numel() for p in m.parameters()), 0),
            )
        else:
            assert isinstance(m, nn.Linear)
            info = LayerInfo(
                n, "linear", m.in_features, m.out_features, (1, 1), (1, 1), 1, None, layer_cost(m)
            )
        out.append(info)
    return out


def modularized_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose attention parents call their projections as modules."""
    clone = copy.deepcopy(model)
    modularize_attention(clone)
    return clone


def _shared_owner(model: nn.Module, name: str, layer: nn.Module) -> str | None:
    """Another module holding one of ``layer``'s parameters (tied weights), if any."""
    mine = {id(p) for p in layer.parameters(recurse=False)}
    for other_name, other in model.named_modules():
        if other is layer or other_name == name:
            continue
        if any(id(p) in mine for p in other.parameters(recurse=False)):
            return other_name
    return None


def normalize_spec(spec: Mapping[str, Mapping[str, Any]]) -> Spec:
    """Check the shape of a compression spec and return a plain, JSON-ready copy."""
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"a compression spec must be a mapping of layer name to "
            f"{{'decomposer': ..., 'ranks': [...]}}, got {type(spec).__name__}"
        )
    out: Spec = {}
    for name, entry in spec.items():
        if not isinstance(entry, Mapping) or "decomposer" not in entry or "ranks" not in entry:
            raise ConfigError(
                f"spec[{name!r}] must be a mapping with 'decomposer' and 'ranks', got {entry!r}"
            )
        unknown = set(entry) - {"decomposer", "ranks", "options"}
        if unknown:
            raise ConfigError(
                f"spec[{name!r}] has unknown keys {sorted(unknown)}; allowed are "
                "'decomposer', 'ranks' and 'options'"
            )
        ranks = entry["ranks"]
        if isinstance(ranks, int):
            ranks = [ranks]
        if not isinstance(ranks, (list, tuple)) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks
        ):
            raise ConfigError(f"spec[{name!r}].ranks must be a list of integers, got {ranks!r}")
        item: dict[str, Any] = {"decomposer": str(entry["decomposer"]), "ranks": [int(r) for r in ranks]}
        if entry.get("options"):
            item["options"] = dict(entry["options"])
        out[str(name)] = item
    return out


def compress(
    model: nn.Module,
    spec: Mapping[str, Mapping[str, Any]],
    *,
    initialize: bool = True,
    inplace: bool = False,
    input_shape: Sequence[int] | None = None,
    example_input: torch.Tensor | None = None,
    check: bool | None = None,
) -> nn.Module:
    """A copy of ``model`` with the layers named in ``spec`` replaced by factorized modules.

    ``spec`` is ``{qualified_name: {"decomposer": name, "ranks": [...], "options": {...}}}``.
    The whole spec is checked (names, decomposers, supported modules, ranks, tied
    weights) before anything is built; the original model is untouched unless ``inplace``.
    ``initialize=False`` builds the structure only (for loading a state_dict).

    Attention parents that read their projections' weights (``nn.MultiheadAttention``,
    torchvision's Swin window attention) become their module-calling equivalents of
    :mod:`rankopt.compression.attention`, so a factorized projection is used by attention's own forward.

    ``check`` (default: when ``initialize``) runs one forward pass on a sample input
    (``example_input``, else zeros of ``input_shape``, else the shape :func:`find_layers`
    last used for ``model``, else a usual shape the model accepts) and raises
    :class:`~rankopt.UnsupportedModuleError` naming the layer if the compressed model
    fails it or skips a compressed layer. Where no sample input is known (or ``check`` is
    False) a static check runs instead, before anything is built: a layer whose parent's
    forward source reads ``self.<layer>.weight`` is refused.

    A model calibrated with ``rankopt.calibrate(..., mode="sequential")`` (or a study's
    reference with ``calibration: {mode: sequential}``) is compressed in forward order,
    each data-aware layer fitted to the inputs the compressed layers before it give it
    (:mod:`rankopt.compression.sequential`).
    """
    from rankopt.compression.forward_check import check_compressed_runs, check_parents_call, sample_input
    from rankopt.compression.calibration_images import sequential_plan
    from rankopt.compression.sequential import fit_in_forward_order
    from rankopt.contract.manager import get_registry

    spec = normalize_spec(spec)
    registry = get_registry()
    plan = []
    for name, entry in spec.items():
        module = get_submodule(model, name)
        dec = registry.create("decomposers", entry["decomposer"])
        dec.check_module(module, name=name)
        ranks = dec.check_ranks(module, entry["ranks"], name=name, options=entry.get("options"))
        plan.append((name, module, dec, ranks, entry.get("options")))
    if check is None:
        check = initialize
    example = sample_input(model, input_shape, example_input, _PROBED_SHAPES.get(model)) if check and plan else None
    target = model if inplace else copy.deepcopy(model)
    modularize_attention(target)
    for name, *_ in plan:
        owner = _shared_owner(target, name, target.get_submodule(name))
        if owner is not None:
            raise UnsupportedModuleError(
                f"layer {name!r} cannot be compressed: its weight is shared with {owner!r} (tied "
                "weights), which a factorized module would untie; exclude one of them"
            )
    if example is None:  # no forward pass to run: read the parents' source instead
        check_parents_call(target, list(spec))
    carried = sequential_plan(target) if initialize and plan else None
    if carried is not None:  # rankopt.calibrate(mode="sequential"): fit in forward order
        fit_in_forward_order(target, spec, carried[0], _compress_one, damping=carried[1], ridge=carried[2])
        plan = []  # the compressed model no longer carries the images (fit_in_forward_order)
    for name, _module, dec, ranks, options in plan:
        original = target.get_submodule(name)
        try:
            new = dec.build(original, ranks, options=options, initialize=initialize)
        except DecompositionError as exc:  # the decomposer knows the kernel, not the layer
            raise DecompositionError(f"layer {name!r} ({dec.name}, ranks {list(ranks)}): {exc}") from exc
        p = next(original.parameters(), None)
        if p is not None:
            new = new.to(device=p.device, dtype=p.dtype)
        set_submodule(target, name, new)
    if example is not None:
        check_compressed_runs(model, target, list(spec), example)
    return target


def _compress_one(model: nn.Module, name: str, entry: Mapping[str, Any]) -> None:
    compress(model, {name: entry}, inplace=True, check=False)
