"""Measured latency of layers, and a per-layer check that keeps the faster form.

FLOPs do not predict speed for every layer: a decomposed conv with few input channels,
or at small spatial size, can run slower than the layer it replaces (see
``benchmarks/RESULTS.md``, "Realized speed"). :func:`keep_faster_layers` measures each
layer of a spec against its original on the study's device and drops the entries that
would slow the model down.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from rankopt.surgery import LayerInfo, Spec, get_submodule, normalize_spec

__all__ = ["measure_latency", "layer_example", "keep_faster_layers"]

# (layer, decomposer, ranks, options, batch, device) -> (original s, decomposed s)
_MEASURED: dict[tuple[Any, ...], tuple[float, float]] = {}


def measure_latency(
    module: nn.Module, example: torch.Tensor, *, repeats: int = 15, warmup: int = 3
) -> float:
    """Median seconds of ``module(example)`` under ``torch.inference_mode``."""
    cuda = example.device.type == "cuda"
    times = []
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(example.device)
                start = time.perf_counter()
                module(example)
                if cuda:
                    torch.cuda.synchronize(example.device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        module.train(was_training)
    return statistics.median(times)


def layer_example(layer: LayerInfo, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zero input of the size ``layer`` sees in the model."""
    if layer.kind == "linear" or layer.input_hw is None:
        return torch.zeros(batch, layer.in_channels, device=device, dtype=dtype)
    return torch.zeros(batch, layer.in_channels, *layer.input_hw, device=device, dtype=dtype)


def keep_faster_layers(
    model: nn.Module,
    spec: Mapping[str, Mapping[str, Any]],
    layers: Sequence[LayerInfo],
    *,
    batch: int = 1,
    tolerance: float = 1.0,
    repeats: int = 15,
) -> tuple[Spec, dict[str, str]]:
    """``spec`` without the layers whose factorized form is slower than the original.

    Each entry's module is built structure-only (latency does not depend on the
    values) and timed against the original at the input size the layer sees, on the
    model's device, at ``batch``. An entry is dropped when decomposed time exceeds
    ``tolerance`` x original time. Returns the kept spec and, per dropped layer, why.
    Measurements are cached per layer shape, ranks, batch and device for the process.
    """
    from rankopt.manager import get_registry

    spec = normalize_spec(spec)
    by_name = {info.name: info for info in layers}
    kept: Spec = {}
    dropped: dict[str, str] = {}
    for name, entry in spec.items():
        info = by_name.get(name)
        original = get_submodule(model, name)
        weight = next(original.parameters(), None)
        if info is None or weight is None:
            kept[name] = entry
            continue
        key = (
            info.shape, info.stride, info.input_hw, entry["decomposer"], tuple(entry["ranks"]),
            repr(sorted((entry.get("options") or {}).items())), batch, str(weight.device), str(weight.dtype),
        )
        if key not in _MEASURED:
            dec = get_registry().create("decomposers", entry["decomposer"])
            built = dec.build(original, entry["ranks"], options=entry.get("options"), initialize=False)
            built = built.to(device=weight.device, dtype=weight.dtype)
            example = layer_example(info, batch, weight.device, weight.dtype)
            _MEASURED[key] = (
                measure_latency(original, example, repeats=repeats),
                measure_latency(built, example, repeats=repeats),
            )
        t_orig, t_dec = _MEASURED[key]
        if t_dec > tolerance * t_orig:
            dropped[name] = (
                f"kept full: {entry['decomposer']} {entry['ranks']} measured "
                f"{t_dec * 1e3:.3f} ms vs {t_orig * 1e3:.3f} ms for the original at batch {batch}"
            )
        else:
            kept[name] = entry
    return kept, dropped
