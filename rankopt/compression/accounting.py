"""Parameter and FLOP accounting.

FLOPs follow :mod:`torch.utils.flop_counter`: a multiply-add is 2 FLOPs, biases,
activations and normalizations are not counted. The per-layer formulas here agree
with it exactly (the tests check that), so decomposers can price a layer without
building it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from rankopt.core.types import Cost

__all__ = [
    "Cost",
    "count",
    "count_flops",
    "conv2d_flops",
    "conv2d_output_hw",
    "linear_flops",
    "layer_cost",
]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = tuple(v)
    return (int(a), int(b))


def conv2d_output_hw(
    input_hw: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | str | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> tuple[int, int]:
    """Spatial output size of a Conv2d (PyTorch's formula, 'same' and 'valid' included)."""
    h, w = _pair(input_hw)  # type: ignore[arg-type]
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    if padding == "same":
        return (h, w)  # PyTorch allows 'same' only with stride 1
    if padding == "valid":
        ph, pw = 0, 0
    else:
        ph, pw = _pair(padding)  # type: ignore[arg-type]
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return (oh, ow)


def conv2d_flops(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    output_hw: Sequence[int],
    groups: int = 1,
    batch: int = 1,
) -> int:
    """FLOPs of a Conv2d as flop_counter counts them: 2 * N * T * H'W' * (S/g) * kh * kw."""
    kh, kw = _pair(kernel_size)
    oh, ow = _pair(output_hw)  # type: ignore[arg-type]
    return 2 * batch * out_channels * (in_channels // groups) * kh * kw * oh * ow


def linear_flops(in_features: int, out_features: int, batch: int = 1) -> int:
    """FLOPs of a Linear layer as flop_counter counts them (bias not counted)."""
    return 2 * batch * in_features * out_features


def layer_cost(module: nn.Module, input_hw: Sequence[int] | None = None) -> Cost:
    """Exact cost of an uncompressed Conv2d or Linear for one sample."""
    params = sum(p.numel() for p in module.parameters())
    if isinstance(module, nn.Conv2d):
        if input_hw is None:
            raise ValueError(
                f"input_hw is required to count the FLOPs of {module!r}; pass the spatial "
                "size (H, W) of its input, e.g. input_hw=(32, 32)"
            )
        out_hw = conv2d_output_hw(
            input_hw, module.kernel_size, module.stride, module.padding, module.dilation
        )
        flops = conv2d_flops(
            module.in_channels, module.out_channels, module.kernel_size, out_hw, module.groups
        )
        return Cost(params, flops)
    if isinstance(module, nn.Linear):
        return Cost(params, linear_flops(module.in_features, module.out_features))
    raise TypeError(f"layer_cost supports Conv2d and Linear, got {type(module).__name__}")


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of ``model(example)`` counted by torch.utils.flop_counter."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def count(
    model: nn.Module,
    input_shape: Sequence[int] = (1, 3, 32, 32),
    *,
    device: torch.device | str | None = None,
) -> Cost:
    """Parameters and FLOPs of a whole model at ``input_shape`` (batch included).

    >>> count(torchvision.models.resnet18(num_classes=10), (1, 3, 32, 32))
    Cost(params=11181642, flops=...)
    """
    params = sum(p.numel() for p in model.parameters())
    p = next(model.parameters(), None)
    if device is None:
        device = p.device if p is not None else "cpu"
    dtype = p.dtype if p is not None and p.is_floating_point() else None  # a .double() model
    example = torch.zeros(tuple(input_shape), device=device, dtype=dtype)
    return Cost(params, count_flops(model, example))
