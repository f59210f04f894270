"""Tucker-2 decomposition of Conv2d layers (the NRMF / TensorLy scheme).

A kernel ``W`` of shape ``(T, S, kh, kw)`` is approximated over its two channel modes
only (a partial Tucker decomposition)::

    W ~= G x_0 U_out x_1 U_in,   G: (r_out, r_in, kh, kw), U_in: (S, r_in), U_out: (T, r_out)

which runs as three convolutions: a 1x1 conv ``S -> r_in`` (``U_in^T``), the ``kh x kw``
core ``r_in -> r_out`` carrying the original stride, padding and dilation, and a 1x1
conv ``r_out -> T`` (``U_out``) carrying the original bias. Ranks are ``(r_in, r_out)``,
the input-channel rank first (the NRMF table's S/R3, T/R4).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from tensorly.decomposition import partial_tucker
from tensorly.tenalg import multi_mode_dot

from rankopt.compression.accounting import Cost, conv2d_flops
from rankopt.core.errors import ConfigError, DecompositionError
from rankopt.contract.hookspecs import hookimpl
from rankopt.compression.calibration import (
    unwhiten_input_factor,
    whiten_input_channels,
    whitened,
)
from rankopt.plugins.decomposers._layers import (
    check_options,
    compute_dtype,
    ConvGeometry,
    make_conv,
    mode_unfolding,
    require_input_hw,
    tensorly_torch,
    thin_svd,
    validate_weight_ranks,
)
from rankopt.contract.decomposer import InputHW, Options
from rankopt.plugins.decomposers._channel_modes import ChannelModesDecomposer
from rankopt.core.records import DecomposerInfo
from rankopt.compression.spectral import get_default_cache

__all__ = ["Tucker2Conv2d", "Tucker2Decomposer", "tucker2_max_ranks"]

INIT_METHODS = ("hosvd", "hooi")


class Tucker2Conv2d(nn.Sequential):
    """A Conv2d in Tucker-2 form: 1x1 ``S -> r_in``, ``kh x kw`` core, 1x1 ``r_out -> T``."""

    def __init__(self, pointwise_in: nn.Conv2d, core: nn.Conv2d, pointwise_out: nn.Conv2d) -> None:
        super().__init__(
            OrderedDict(pointwise_in=pointwise_in, core=core, pointwise_out=pointwise_out)
        )

    @property
    def ranks(self) -> tuple[int, int]:
        return (self.core.in_channels, self.core.out_channels)  # type: ignore[return-value]

    def reconstruct_weight(self) -> torch.Tensor:
        """The full ``(T, S, kh, kw)`` kernel this module computes."""
        u_in = self.pointwise_in.weight[:, :, 0, 0]  # (r_in, S)
        u_out = self.pointwise_out.weight[:, :, 0, 0]  # (T, r_out)
        return torch.einsum("ab,bcij,cd->adij", u_out, self.core.weight, u_in)


def tucker2_max_ranks(out_channels: int, in_channels: int, kernel_numel: int) -> tuple[int, int]:
    """``(min(S, T*kh*kw), min(T, S*kh*kw))``: the ranks of the two mode unfoldings."""
    return (min(in_channels, out_channels * kernel_numel), min(out_channels, in_channels * kernel_numel))


class Tucker2Decomposer(ChannelModesDecomposer):
    """Tucker-2 (partial Tucker over the channel modes) for Conv2d.

    Options (stored in the spec's ``options``):

    * ``init``: ``"hosvd"`` (default) takes the truncated SVDs of the mode-1 (input
      channels) and mode-0 (output channels) unfoldings from
      :func:`rankopt.compression.spectral.get_default_cache`, so rank selectors and the
      decomposition share one SVD per weight; the core is ``W x_0 U_out^T x_1 U_in^T``
      (TensorLy ``multi_mode_dot``). ``"hooi"`` refines that start with TensorLy's
      ``partial_tucker`` (higher-order orthogonal iteration), which lowers the
      reconstruction error at truncated ranks at the price of an SVD per iteration.
    * ``n_iter_max`` (100) and ``tol`` (1e-4): HOOI's iteration limit and tolerance
      on the change of the relative error; ignored by ``"hosvd"``.

    :meth:`project` computes its SVDs directly on the weight's device (the weight changes
    between calls, so caching would only miss).

    Data-aware: when the layer carries input statistics (:mod:`rankopt.compression.calibration`;
    studies collect them by default), :meth:`build` decomposes the kernel with its
    input-channel mode whitened by the channels' second moment and maps the input
    factor back, so the truncation minimises the output error rather than the weight
    error; spectrum-reading selectors read the whitened unfoldings. :meth:`project`
    (DeepTwist, ADMM) stays in weight space.
    """

    name = "tucker2"
    description = "Tucker-2: 1x1, kxk core, 1x1 (NRMF); ranks (r_in, r_out)"
    rank_names = ("r_in", "r_out")
    module_types = (nn.Conv2d,)
    DEFAULT_OPTIONS: Mapping[str, Any] = {"init": "hosvd", "n_iter_max": 100, "tol": 1e-4}

    # -- options and ranks -----------------------------------------------------------
    def _options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = check_options(options, self.DEFAULT_OPTIONS, self.name)
        if opts["init"] not in INIT_METHODS:
            raise ConfigError(
                f"tucker2 option init must be one of {list(INIT_METHODS)}, got {opts['init']!r}"
            )
        n = opts["n_iter_max"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"tucker2 option n_iter_max must be an integer >= 1, got {n!r}")
        tol = opts["tol"]
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
            raise ConfigError(f"tucker2 option tol must be a number >= 0, got {tol!r}")
        return opts

    def max_ranks(self, module: nn.Module, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        self.check_module(module)
        g = ConvGeometry.of(module)  # type: ignore[arg-type]
        return tucker2_max_ranks(g.out_channels, g.in_channels, g.kernel_numel)

    def _weight_ranks(self, weight: torch.Tensor, ranks: Sequence[int]) -> tuple[int, int]:
        if weight.dim() != 4:
            raise ConfigError(
                f"tucker2 works on 4-d conv kernels (T, S, kh, kw), got a weight of shape {tuple(weight.shape)}"
            )
        t, s, kh, kw = weight.shape
        largest = tucker2_max_ranks(t, s, kh * kw)
        return validate_weight_ranks(self.name, self.rank_names, ranks, largest)  # type: ignore[return-value]

    # -- accounting --------------------------------------------------------------------
    def checked_cost(self, module: nn.Module, ranks: tuple[int, ...], input_hw: InputHW, options: Options) -> Cost:
        r_in, r_out = ranks
        hw = require_input_hw(module, input_hw, self.name)
        g = ConvGeometry.of(module)  # type: ignore[arg-type]
        s, t = g.in_channels, g.out_channels
        out_hw = g.output_hw(hw)
        params = s * r_in + r_in * r_out * g.kernel_numel + r_out * t + (t if g.bias else 0)
        flops = (
            conv2d_flops(s, r_in, (1, 1), hw)  # the 1x1 runs at the input's resolution
            + conv2d_flops(r_in, r_out, g.kernel_size, out_hw)
            + conv2d_flops(r_out, t, (1, 1), out_hw)
        )
        return Cost(params, flops)

    # -- the decomposition -----------------------------------------------------------------
    def ranks_from_matrix_ranks(self, module: nn.Module, matrix_ranks: Sequence[int], options: Options = None) -> tuple[int, ...]:
        largest = self.max_ranks(module, options)
        return tuple(max(1, min(int(r), hi)) for r, hi in zip(matrix_ranks, largest))

    def factors(
        self,
        weight: torch.Tensor,
        ranks: Sequence[int],
        options: Mapping[str, Any] | None = None,
        whitening: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(core, U_in, U_out)`` of ``weight`` on its device, in its (SVD-able) dtype.

        With ``whitening = (L, L^-1)`` of the input channels' second moment
        (:mod:`rankopt.compression.calibration`), the decomposition is of ``W x_1 L^T`` and the
        input factor returned is ``L^-T U_in``: ``W ~ core x_0 U_out x_1 U_in`` still
        holds, with the truncation chosen for the output error (exact at full rank).
        """
        opts = self._options(options)
        r_in, r_out = self._weight_ranks(weight, ranks)
        w = weight.detach()
        dtype = compute_dtype(w.dtype)
        if whitening is not None:
            dtype = torch.float64
            w = whiten_input_channels(w.to(dtype), whitening[0].to(w.device, dtype))
        cache = get_default_cache()
        u_in = cache.svd(mode_unfolding(w, 1))[0][:, :r_in].to(device=w.device, dtype=dtype)
        u_out = cache.svd(mode_unfolding(w, 0))[0][:, :r_out].to(device=w.device, dtype=dtype)
        core, u_in, u_out = self._core_and_factors(w.to(dtype), u_in, u_out, opts)
        if whitening is not None:
            out_dtype = compute_dtype(weight.dtype)
            u_in = unwhiten_input_factor(u_in, whitening[1].to(w.device, dtype))
            # unit columns again, their scale moved into the core (the same product):
            # factors of very unequal scale make fine-tuning's SGD steps unstable
            norms = u_in.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)
            u_in, core = u_in / norms, core * norms[None, :, None, None]
            core, u_in, u_out = (t.to(out_dtype) for t in (core, u_in, u_out))
        return core, u_in, u_out

    def _core_and_factors(
        self, w: torch.Tensor, u_in: torch.Tensor, u_out: torch.Tensor, opts: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with tensorly_torch():
            core = multi_mode_dot(w, [u_out, u_in], modes=[0, 1], transpose=True)
            if opts["init"] == "hooi":
                (core, (u_out, u_in)), _ = partial_tucker(
                    w,
                    rank=[u_out.shape[1], u_in.shape[1]],
                    modes=[0, 1],
                    init=(core, [u_out, u_in]),
                    n_iter_max=opts["n_iter_max"],
                    tol=opts["tol"],
                )
        if not all(torch.isfinite(t).all() for t in (core, u_in, u_out)):
            raise DecompositionError(
                f"tucker2 ({opts['init']}) of a kernel of shape {tuple(w.shape)} produced non-finite "
                "factors; the weight itself may contain NaN/inf (check the training loss)"
            )
        return core, u_in, u_out

    def checked_build(self, module: nn.Module, ranks: tuple[int, ...], options: Options, initialize: bool) -> nn.Module:
        self._options(options)
        r_in, r_out = ranks
        g = ConvGeometry.of(module)  # type: ignore[arg-type]
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        kw = {"device": weight.device, "dtype": weight.dtype}
        built = Tucker2Conv2d(
            make_conv(g.in_channels, r_in, (1, 1), **kw),
            make_conv(
                r_in, r_out, g.kernel_size, stride=g.stride, padding=g.padding, dilation=g.dilation, **kw
            ),
            make_conv(r_out, g.out_channels, (1, 1), bias=g.bias, **kw),
        )
        if initialize:
            white = whitened(module, "channel", weight.detach().to(torch.float64))
            core, u_in, u_out = self.factors(weight, (r_in, r_out), options, whitening=white)
            with torch.no_grad():
                built.pointwise_in.weight.copy_(u_in.T[:, :, None, None])
                built.core.weight.copy_(core)
                built.pointwise_out.weight.copy_(u_out[:, :, None, None])
            self.set_output_bias(built, module)
        return built

    def project(
        self, weight: torch.Tensor, ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        opts = self._options(options)
        r_in, r_out = self._weight_ranks(weight, ranks)
        w = weight.detach().to(compute_dtype(weight.dtype))
        u_in = thin_svd(mode_unfolding(w, 1))[0][:, :r_in]
        u_out = thin_svd(mode_unfolding(w, 0))[0][:, :r_out]
        core, u_in, u_out = self._core_and_factors(w, u_in, u_out, opts)
        with tensorly_torch():
            approx = multi_mode_dot(core, [u_out, u_in], modes=[0, 1])
        return approx.to(weight.dtype)


@hookimpl
def rankopt_decomposers() -> list[DecomposerInfo]:
    return [DecomposerInfo("tucker2", Tucker2Decomposer, Tucker2Decomposer.description)]
