"""The forward pass a compressed model must survive before :func:`rankopt.compress` returns it.

A parent module that reads a child's ``.weight`` directly (instead of calling the child)
breaks when the child is replaced by a factorized module: the forward either raises
(``'SVDLinear' object has no attribute 'weight'``) or, worse, silently skips the new
module. One forward pass on a sample input finds both, and the traceback names the layer.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from rankopt.core.errors import ConfigError, UnsupportedModuleError

__all__ = ["check_compressed_runs", "check_parents_call", "sample_input"]


# they read their children's weights only on their fused fast path, which a rewritten
# attention (rankopt.compression.attention.ModularMultiheadAttention: no in_proj_bias) never takes
_FAST_PATH_PARENTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@functools.lru_cache(maxsize=256)
def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):  # built in, or defined where the source is not kept
        return ""


def check_parents_call(model: nn.Module, names: Sequence[str]) -> None:
    """Refuse, before anything is built, a layer whose parent's ``forward`` reads
    ``self.<layer>.weight`` (or ``.bias``) in its source instead of calling the layer."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, _FAST_PATH_PARENTS):
            continue
        source = _forward_source(type(parent))
        if re.search(rf"self\.{re.escape(leaf)}\.(weight|bias)\b", source):
            raise UnsupportedModuleError(
                f"layer {name!r} cannot be compressed: its parent {type(parent).__name__} reads "
                f"self.{leaf}.weight in its forward instead of calling the layer, so a factorized "
                "module would break it; exclude the layer (targets.exclude)"
            )


def _first_layer(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Conv1d))), None)


def _guesses(model: nn.Module) -> list[tuple[int, ...]]:
    first = _first_layer(model)
    if isinstance(first, nn.Linear):
        return [(1, first.in_features)]
    if isinstance(first, nn.Conv2d):
        sizes = [getattr(model, "image_size", None), 32, 224]
        return [(1, first.in_channels, s, s) for s in dict.fromkeys(sizes) if isinstance(s, int)]
    return []


def _runs(model: nn.Module, example: torch.Tensor) -> bool:
    try:
        _forward(model, example)
    except Exception:  # a wrong guess of the input shape, not a broken model
        return False
    return True


def _forward(model: nn.Module, example: torch.Tensor) -> Any:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(example)
    finally:
        model.train(was_training)


def _like(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else None
    return torch.zeros(tuple(int(d) for d in shape), device=device, dtype=dtype)


def sample_input(
    model: nn.Module,
    input_shape: Sequence[int] | None,
    example_input: torch.Tensor | None,
    remembered: Sequence[int] | None = None,
) -> torch.Tensor | None:
    """The input the check runs: ``example_input``, else zeros of ``input_shape``, else of the
    shape :func:`rankopt.find_layers` last saw for this model, else the first of a few usual
    shapes (from the first layer: 32x32 and 224x224 images, or one feature vector) that the
    uncompressed ``model`` accepts; None when none of them runs."""
    if example_input is not None:
        return example_input
    if input_shape is not None:
        shape = tuple(input_shape)
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ConfigError(f"input_shape must be positive integers, batch first (e.g. (1, 3, 32, 32)), got {list(shape)}")
        return _like(model, shape)
    if remembered is not None:
        return _like(model, remembered)
    for shape in _guesses(model):
        example = _like(model, shape)
        if _runs(model, example):
            return example
    return None  # no shape known: compress relies on the static check alone


def _culprit(tb: types.TracebackType | None, new: dict[int, str]) -> tuple[str | None, str | None]:
    """The compressed layer whose attribute access failed, and the module that made it."""
    caller = None
    found = None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in new:
            found = new[id(owner)]
            break
        if isinstance(owner, nn.Module):
            caller = type(owner).__name__
        tb = tb.tb_next
    return found, caller


def _called(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> tuple[set[str], BaseException | None]:
    seen: set[str] = set()
    handles = []
    for name in names:
        def hook(mod: nn.Module, args: Any, name: str = name) -> None:
            seen.add(name)

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        _forward(model, example)
    except Exception as exc:  # reported by the caller, with the layer named
        return seen, exc
    finally:
        for h in handles:
            h.remove()
    return seen, None


def check_compressed_runs(
    original: nn.Module, compressed: nn.Module, names: Sequence[str], example: torch.Tensor
) -> None:
    """Raise, naming the layer, unless ``compressed(example)`` runs and calls every
    compressed layer that the uncompressed model calls."""
    if not names:
        return
    new = {id(compressed.get_submodule(n)): n for n in names}
    shape = list(example.shape)
    called, exc = _called(compressed, names, example)
    if exc is not None:
        layer, reader = _culprit(exc.__traceback__, new)
        if layer is not None:
            raise UnsupportedModuleError(
                f"layer {layer!r} cannot be compressed: after surgery the model's forward fails in "
                f"{reader or 'its parent'}, which reads the layer's weights directly "
                f"({type(exc).__name__}: {exc}); exclude the layer (targets.exclude)"
            ) from exc
        raise UnsupportedModuleError(
            f"the compressed model fails its forward pass on an input of shape {shape} "
            f"({type(exc).__name__}: {exc}); compressed layers: {list(names)[:8]}"
            f"{' ...' if len(names) > 8 else ''}; exclude the layer the traceback names"
        ) from exc
    missing = [n for n in names if n not in called]
    if not missing:
        return
    from rankopt.compression.attention import modularize_attention

    before = copy.deepcopy(original)
    modularize_attention(before)
    was_called, _ = _called(before, missing, example)
    bypassed = [n for n in missing if n in was_called]
    if bypassed:
        raise UnsupportedModuleError(
            f"layer {bypassed[0]!r} cannot be compressed: the compressed model runs without "
            "calling it, so its parent reads the layer's weights directly and the factorized "
            f"module would be ignored; exclude the layer (targets.exclude)"
            + (f" (also {bypassed[1:]})" if len(bypassed) > 1 else "")
        )
