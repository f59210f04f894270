"""Helpers shared by the built-in decomposers: conv geometry, options, module factories.

Nothing here is public API; the decomposer classes are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tensorly as tl
import torch
import torch.nn as nn

from rankopt.compression.accounting import conv2d_output_hw
from rankopt.core.errors import ConfigError, InvalidRanksError

__all__ = [
    "ConvGeometry",
    "Padding",
    "check_options",
    "compute_dtype",
    "make_conv",
    "make_linear",
    "require_input_hw",
    "tensorly_torch",
    "validate_weight_ranks",
    "mode_unfolding",
    "input_output_unfoldings",
    "copy_bias",
    "thin_svd",
]

Padding = tuple[int, int] | str


@dataclass(frozen=True)
class ConvGeometry:
    """The shape and sliding parameters of a Conv2d (groups == 1)."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: Padding  # (ph, pw), 'same' or 'valid'
    dilation: tuple[int, int]
    bias: bool

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),  # type: ignore[arg-type]
            tuple(conv.stride),  # type: ignore[arg-type]
            padding,  # type: ignore[arg-type]
            tuple(conv.dilation),  # type: ignore[arg-type]
            conv.bias is not None,
        )

    @property
    def kernel_numel(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def output_hw(self, input_hw: Sequence[int]) -> tuple[int, int]:
        return conv2d_output_hw(input_hw, self.kernel_size, self.stride, self.padding, self.dilation)

    def axis(self, axis: int) -> tuple[int, int, int | str, int]:
        """(kernel, stride, padding, dilation) along one spatial axis (0 = H, 1 = W).

        A string padding ('same'/'valid') is kept as is: PyTorch applies it per axis,
        so a kx1 or 1xk conv given 'same' pads exactly the original's (possibly
        asymmetric, for even kernels) amount on its own axis and nothing on the other.
        """
        pad: int | str = self.padding if isinstance(self.padding, str) else self.padding[axis]
        return self.kernel_size[axis], self.stride[axis], pad, self.dilation[axis]


def require_input_hw(module: nn.Module, input_hw: Sequence[int] | None, decomposer: str) -> tuple[int, int]:
    """``input_hw`` as a pair, or a ConfigError saying that conv FLOPs need it."""
    if input_hw is None:
        raise ConfigError(
            f"{decomposer}.cost() of a {type(module).__name__} needs input_hw, the spatial size "
            "(H, W) of the layer's input, to count FLOPs; got None. Pass e.g. input_hw=(32, 32) "
            "(rankopt.find_layers reports it per layer)"
        )
    hw = tuple(int(v) for v in input_hw)
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"input_hw must be two positive integers (H, W), got {list(input_hw)!r}")
    return hw  # type: ignore[return-value]


def check_options(
    options: Mapping[str, Any] | None, defaults: Mapping[str, Any], decomposer: str
) -> dict[str, Any]:
    """``defaults`` updated with ``options``; unknown keys fail, never dropped."""
    if options is None:
        return dict(defaults)
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"{decomposer} options must be a mapping, got {type(options).__name__}; "
            f"known options are {sorted(defaults)}"
        )
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown {decomposer} option(s) {unknown}; known options are {sorted(defaults)}"
        )
    merged = dict(defaults)
    merged.update(options)
    return merged


def validate_weight_ranks(
    decomposer: str, rank_names: Sequence[str], ranks: Sequence[int] | int, largest: Sequence[int]
) -> tuple[int, ...]:
    """Check ranks passed with a bare weight (project): right length, ints in [1, largest]."""
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        ranks = (ranks,)
    ranks = tuple(ranks)
    if len(ranks) != len(largest):
        raise InvalidRanksError(
            f"{decomposer} ranks must have {len(largest)} entries {tuple(rank_names)}, got {list(ranks)}"
        )
    for name, r, hi in zip(rank_names, ranks, largest):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= hi:
            raise InvalidRanksError(
                f"{decomposer} rank {name} must be an integer in [1, {hi}], got {r!r}; "
                f"the largest ranks for this weight are {list(largest)}"
            )
    return ranks


def input_output_unfoldings(weight: torch.Tensor) -> list[torch.Tensor]:
    """[mode-1 unfolding (input channels), mode-0 unfolding (output channels)] of a conv kernel:
    the matrices whose spectra govern a channel-wise decomposition's ranks."""
    w = weight.detach()
    return [mode_unfolding(w, 1), mode_unfolding(w, 0)]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to factorize in: half precisions have no SVD kernels, so use float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def mode_unfolding(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """TensorLy's mode-``mode`` unfolding (``tl.unfold``) written for torch tensors."""
    return torch.movedim(tensor, mode, 0).reshape(tensor.shape[mode], -1)


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)``, run on the tall orientation.

    LAPACK is several times faster on a tall matrix than on its wide transpose, and
    conv unfoldings are wide (S x T*kh*kw).
    """
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = torch.linalg.svd(matrix.T, full_matrices=False)
        return vh.T, s, u.T
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


@contextlib.contextmanager
def tensorly_torch() -> Iterator[None]:
    """Run TensorLy on its PyTorch backend in this thread only, so tensors keep their device."""
    with tl.backend_context("pytorch", local_threadsafe=True):
        yield


def _factory(dtype: torch.dtype | None) -> dict[str, Any]:
    # allocate on 'meta' and materialize afterwards: skips the default kaiming init,
    # which is slow for big layers and is overwritten by the factors anyway
    return {"device": "meta", "dtype": dtype}


def _materialize(module: nn.Module, device: torch.device | None) -> nn.Module:
    module = module.to_empty(device=device or torch.device("cpu"))
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()  # deterministic contents until factors or a state_dict are loaded
    return module


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    *,
    stride: tuple[int, int] = (1, 1),
    padding: Padding | tuple[int | str, int | str] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    bias: bool = False,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Conv2d:
    """A zero-filled nn.Conv2d on ``device``/``dtype`` (the caller copies the factors in)."""
    conv = nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=padding,  # type: ignore[arg-type]
        dilation=dilation,
        groups=groups,
        bias=bias,
        **_factory(dtype),
    )
    return _materialize(conv, device)  # type: ignore[return-value]


def make_linear(
    in_features: int,
    out_features: int,
    *,
    bias: bool,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Linear:
    """A zero-filled nn.Linear on ``device``/``dtype`` (the caller copies the factors in)."""
    lin = nn.Linear(in_features, out_features, bias=bias, **_factory(dtype))
    return _materialize(lin, device)  # type: ignore[return-value]


def copy_bias(target: nn.Module, source: nn.Module) -> None:
    """Copy ``source.bias`` into ``target.bias`` (both present or both absent)."""
    if source.bias is not None:  # type: ignore[union-attr]
        with torch.no_grad():
            target.bias.copy_(source.bias)  # type: ignore[union-attr,operator]
