"""The ``tensor_ring`` decomposer: Conv2d layers as Tensor Ring nets (Wang et al., CVPR 2018)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from rankopt import ConfigError, Cost, Decomposer, InputHW, InvalidRanksError
from rankopt import DecomposerOptions as Options
from rankopt_tensor_ring.layer import TensorRingConv2d
from rankopt_tensor_ring.ring import (
    balanced_factors,
    kernel_to_ring,
    ring_max_ranks,
    ring_reconstruct,
    ring_to_kernel,
    tr_svd,
)

__all__ = ["TensorRingDecomposer"]

OPTION_KEYS = ("in_factors", "out_factors")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _output_hw(module: nn.Conv2d, hw: Sequence[int]) -> tuple[int, int]:
    # rankopt's own helper is not public API; this is PyTorch's formula
    if module.padding == "same":
        return (int(hw[0]), int(hw[1]))
    pad = (0, 0) if module.padding == "valid" else _pair(module.padding)
    out = []
    for i in range(2):
        k, s, d = module.kernel_size[i], module.stride[i], module.dilation[i]
        out.append((int(hw[i]) + 2 * pad[i] - d * (k - 1) - 1) // s + 1)
    return (out[0], out[1])


class TensorRingDecomposer(Decomposer):
    """Tensor Ring (TR) decomposition of Conv2d kernels, initialized by TR-SVD.

    The input channels ``S`` are factorized as ``I_1 ... I_din`` and the output channels
    ``T`` as ``O_1 ... O_dout``; the kernel becomes a ring of ``d = din + 1 + dout``
    cores: the input cores ``(r_i, I_i, r_{i+1})``, the conv core ``(r_din, kh*kw,
    r_{din+1})`` and the output cores, the last one closing the ring on ``r_0``. The
    layer (:class:`TensorRingConv2d`) computes contract-in, the conv core and
    contract-out as in the paper.

    Ranks are the ``d`` bond ranks ``(r_0, r_1, ..., r_{d-1})``: ``r_0`` closes the ring
    (last output core to first input core), ``r_k`` joins core ``k-1`` and core ``k``.
    The paper uses one rank R for every bond; pass ``(R,) * d`` for that.

    Options (stored in the compression spec):

    * ``in_factors``, ``out_factors``: the channel factorizations (their products must
      equal the layer's channels). Default: two balanced factors each
      (:func:`balanced_factors`, e.g. 64 -> [8, 8]); a prime count stays one factor.

    Initialization and :meth:`project` use TR-SVD (Zhao et al., 2016) from the largest
    mode, with a canonical basis for the first core so that the projection is
    idempotent and the module built from a projected weight reproduces it exactly;
    the rest is TensorLy's TT-SVD. TR-SVD bounds the two bonds next to its start core
    by that mode's size, which :meth:`max_ranks` reflects (see
    :func:`rankopt_tensor_ring.ring.ring_max_ranks`). ``rank_matrices`` is not
    provided: choose ranks with the ``fixed`` selector (fractions of the largest
    ranks) or explicit per-layer ranks.
    """

    name = "tensor_ring"
    description = "Tensor Ring conv: input cores, conv core, output cores in a ring (Wang et al., CVPR 2018)"
    rank_names: tuple[str, ...] = ()  # (r_0, ..., r_{d-1}); d depends on the options
    module_types = (nn.Conv2d,)

    # -- options -----------------------------------------------------------------------
    def default_options(self, module: nn.Module) -> dict[str, Any]:
        self.check_module(module)
        assert isinstance(module, nn.Conv2d)
        return {
            "in_factors": balanced_factors(module.in_channels),
            "out_factors": balanced_factors(module.out_channels),
        }

    def _factors(self, in_channels: int, out_channels: int, options: Mapping[str, Any] | None) -> tuple[list[int], list[int]]:
        opts = dict(options or {})
        unknown = sorted(set(opts) - set(OPTION_KEYS))
        if unknown:
            raise ConfigError(
                f"tensor_ring has no option(s) {unknown}; known options are {list(OPTION_KEYS)}"
            )
        out = []
        for key, channels in (("in_factors", in_channels), ("out_factors", out_channels)):
            factors = opts.get(key, balanced_factors(channels))
            if (
                not isinstance(factors, (list, tuple))
                or not factors
                or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in factors)
            ):
                raise ConfigError(
                    f"tensor_ring option {key} must be a non-empty list of positive integers, got {factors!r}"
                )
            if math.prod(factors) != channels:
                raise ConfigError(
                    f"tensor_ring option {key}={list(factors)} multiplies to {math.prod(factors)}, "
                    f"but the layer has {channels} {key.split('_')[0]}put channels; "
                    f"use factors whose product is {channels}, e.g. {balanced_factors(channels)}"
                )
            out.append([int(f) for f in factors])
        return out[0], out[1]

    def _modes(self, module: nn.Conv2d, options: Mapping[str, Any] | None) -> tuple[list[int], list[int], list[int]]:
        fin, fout = self._factors(module.in_channels, module.out_channels, options)
        kh, kw = module.kernel_size
        return fin, fout, [*fin, kh * kw, *fout]

    # -- ranks and cost ----------------------------------------------------------------
    def max_ranks(self, module: nn.Module, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        self.check_module(module)
        assert isinstance(module, nn.Conv2d)
        return ring_max_ranks(self._modes(module, options)[2])

    def checked_cost(self, module: nn.Module, ranks: tuple[int, ...], input_hw: InputHW, options: Options) -> Cost:
        assert isinstance(module, nn.Conv2d)
        r = ranks
        if input_hw is None:
            raise ConfigError(
                "tensor_ring cost() needs input_hw, the (H, W) of the layer's input, to count FLOPs"
            )
        fin, fout, modes = self._modes(module, options)
        d_in, d = len(fin), len(modes)
        kh, kw = module.kernel_size
        h, w = int(input_hw[0]), int(input_hw[1])
        ho, wo = _output_hw(module, (h, w))
        s, t = module.in_channels, module.out_channels
        params = sum(r[k] * modes[k] * r[(k + 1) % d] for k in range(d))
        params += t if module.bias is not None else 0
        r0, r_din, r_mid = r[0], r[d_in], r[d_in + 1]
        flops = 0
        merged = fin[0]  # contract-in: merge the input cores one matrix product at a time
        for i in range(1, d_in):
            flops += 2 * r0 * merged * r[i] * fin[i] * r[i + 1]
            merged *= fin[i]
        flops += 2 * (r0 * r_din) * s * h * w  # 1x1 conv S -> r0 * r_din
        flops += 2 * r0 * r_mid * r_din * kh * kw * ho * wo  # the conv core on r0 slices
        merged = fout[0]
        for j in range(1, len(fout)):
            k = d_in + 1 + j
            flops += 2 * r_mid * merged * r[k] * fout[j] * r[(k + 1) % d]
            merged *= fout[j]
        flops += 2 * t * (r0 * r_mid) * ho * wo  # 1x1 conv r0 * r_mid -> T
        return Cost(params, flops)

    # -- building and projecting ----------------------------------------------------------
    def checked_build(self, module: nn.Module, ranks: tuple[int, ...], options: Options, initialize: bool) -> nn.Module:
        assert isinstance(module, nn.Conv2d)
        r = ranks
        fin, fout, _ = self._modes(module, options)
        weight = module.weight
        layer = TensorRingConv2d(
            fin,
            fout,
            r,
            tuple(module.kernel_size),  # type: ignore[arg-type]
            stride=tuple(module.stride),  # type: ignore[arg-type]
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),  # type: ignore[arg-type]
            dilation=tuple(module.dilation),  # type: ignore[arg-type]
            bias=module.bias is not None,
        ).to(device=weight.device, dtype=weight.dtype)
        if initialize:
            cores = tr_svd(kernel_to_ring(weight.detach(), fin, fout), r)
            d_in = len(fin)
            with torch.no_grad():
                for param, core in zip(layer.in_cores, cores[:d_in]):
                    param.copy_(core)
                kc = cores[d_in]  # (r_din, kh*kw, r_mid) -> (r_mid, r_din, kh, kw)
                layer.kernel_core.copy_(kc.permute(2, 0, 1).reshape(layer.kernel_core.shape))
                for param, core in zip(layer.out_cores, cores[d_in + 1 :]):
                    param.copy_(core)
                if module.bias is not None and layer.bias is not None:
                    layer.bias.copy_(module.bias.detach())
        return layer

    def project(
        self, weight: torch.Tensor, ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        if weight.dim() != 4:
            raise ConfigError(
                f"tensor_ring projects 4-d conv kernels (T, S, kh, kw), got shape {tuple(weight.shape)}"
            )
        t, s, kh, kw = weight.shape
        fin, fout = self._factors(s, t, options)
        modes = [*fin, kh * kw, *fout]
        largest = ring_max_ranks(modes)
        r = tuple(ranks)
        if len(r) != len(largest) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= hi for x, hi in zip(r, largest)
        ):
            raise InvalidRanksError(
                f"tensor_ring ranks must be {len(largest)} integers within [1, {list(largest)}], got {list(r)}"
            )
        with torch.no_grad():
            cores = tr_svd(kernel_to_ring(weight.detach(), fin, fout), r)
            full = ring_reconstruct(cores)
        return ring_to_kernel(full, fin, fout, (kh, kw)).to(weight.dtype)
