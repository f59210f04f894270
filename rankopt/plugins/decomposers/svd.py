"""Truncated-SVD (2-D low-rank) decomposition of Linear and Conv2d layers.

A Linear ``W: (out, in)`` becomes ``in -> r`` (no bias) then ``r -> out`` (the original
bias). A Conv2d is lowered (im2col view, as DeepTwist's 2-D SVD): ``W`` reshaped to
``T x (S*kh*kw)`` is factorized, giving a ``kh x kw`` conv ``S -> r`` with the original
stride, padding and dilation, then a 1x1 conv ``r -> T`` with the bias. Ranks: ``(r,)``.

Option ``tiles: [a, b]``: DeepTwist's tiling-based SVD (seeds/002 section 4.2), the
matrix cut into ``a x b`` tiles each with its own rank-``r`` SVD (:mod:`._tiles`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from rankopt.compression.accounting import Cost, conv2d_flops, linear_flops
from rankopt.core.errors import ConfigError, DecompositionError
from rankopt.contract.hookspecs import hookimpl
from rankopt.compression.calibration import correct_bias, whiten_columns, whitened
from rankopt.plugins.decomposers._layers import (
    ConvGeometry,
    check_options,
    compute_dtype,
    copy_bias,
    make_conv,
    make_linear,
    require_input_hw,
    thin_svd,
    validate_weight_ranks,
)
from rankopt.plugins.decomposers._tiles import (
    TiledSVDConv2d,
    TiledSVDLinear,
    check_tiles,
    tile_max_rank,
    tiled_factors,
    tiled_project,
)
from rankopt.contract.decomposer import Decomposer, InputHW, Options
from rankopt.core.records import DecomposerInfo
from rankopt.compression.spectral import get_default_cache

__all__ = ["SVDConv2d", "SVDDecomposer", "SVDLinear"]

SPLITS = ("balanced", "first", "second")


class SVDLinear(nn.Sequential):
    """A Linear as two: ``in -> r`` without bias, ``r -> out`` with the original bias."""

    def __init__(self, linear_in: nn.Linear, linear_out: nn.Linear) -> None:
        super().__init__(OrderedDict(linear_in=linear_in, linear_out=linear_out))

    def reconstruct_weight(self) -> torch.Tensor:
        return self.linear_out.weight @ self.linear_in.weight


class SVDConv2d(nn.Sequential):
    """A Conv2d as a ``kh x kw`` conv ``S -> r`` then a 1x1 conv ``r -> T`` (with the bias)."""

    def __init__(self, spatial: nn.Conv2d, pointwise_out: nn.Conv2d) -> None:
        super().__init__(OrderedDict(spatial=spatial, pointwise_out=pointwise_out))

    def reconstruct_weight(self) -> torch.Tensor:
        r = self.spatial.out_channels
        w = self.pointwise_out.weight[:, :, 0, 0] @ self.spatial.weight.reshape(r, -1)
        return w.reshape(-1, *self.spatial.weight.shape[1:])


def _kind(module: nn.Module) -> str:
    """The input statistics the SVD of this layer whitens by (:mod:`rankopt.compression.calibration`)."""
    return "patch" if isinstance(module, nn.Conv2d) else "channel"


def _matrix(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D matrix that is factorized: the weight itself, or a kernel as T x (S*kh*kw)."""
    if weight.dim() not in (2, 4):
        raise ConfigError(
            f"svd works on Linear weights (out, in) and conv kernels (T, S, kh, kw), "
            f"got a weight of shape {tuple(weight.shape)}"
        )
    return weight.reshape(weight.shape[0], -1)


class SVDDecomposer(Decomposer):
    """Truncated SVD for Linear and (lowered) Conv2d.

    Options: ``split`` says where the singular values go: ``"balanced"`` (default,
    ``sqrt(s)`` on each factor, which keeps both factors on the same scale for
    fine-tuning), ``"first"`` (all on the first layer, the second is orthonormal) or
    ``"second"``. ``tiles`` (default None: one tile) ``[a, b]`` cuts the matrix into
    ``a`` row blocks and ``b`` column blocks of equal size (``a`` and ``b`` must divide the
    matrix's rows and columns evenly, else a ConfigError names the divisors) and gives each tile
    its own truncated SVD at rank ``r``, at most the smallest tile side (DeepTwist's
    tiling-based SVD for skewed lowered kernels); params ``r * (a*n + b*m)`` for an
    ``m x n`` matrix. Spectrum-reading selectors do not apply to tiles (one rank for
    many spectra); use ``fixed`` ranks or fractions. :meth:`build` takes the SVD from the shared spectral cache;
    :meth:`project` computes it on the weight's device.

    Data-aware: when the layer carries input statistics (:mod:`rankopt.compression.calibration`;
    studies collect them by default, ``calibration:``), :meth:`build` truncates the
    whitened matrix ``W L`` (a Linear's input features; a conv's im2col patches), which
    minimises the output error on those inputs, and the spectrum-reading selectors read
    ``W L``'s spectrum. Tiles and :meth:`project` stay in weight space.
    """

    name = "svd"
    description = "Truncated SVD: Linear as two Linears, Conv2d as kxk conv then 1x1; ranks (r,)"
    rank_names = ("r",)
    module_types = (nn.Conv2d, nn.Linear)
    DEFAULT_OPTIONS: Mapping[str, Any] = {"split": "balanced", "tiles": None}

    def _options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = check_options(options, self.DEFAULT_OPTIONS, self.name)
        if opts["split"] not in SPLITS:
            raise ConfigError(f"svd option split must be one of {list(SPLITS)}, got {opts['split']!r}")
        opts["tiles"] = check_tiles(opts["tiles"])
        return opts

    def max_ranks(self, module: nn.Module, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        self.check_module(module)
        rows, cols = _matrix(module.weight).shape  # type: ignore[arg-type]
        tiles = check_tiles(self._options(options)["tiles"], (rows, cols))
        return (min(rows, cols) if tiles is None else tile_max_rank((rows, cols), tiles),)

    def checked_cost(self, module: nn.Module, ranks: tuple[int, ...], input_hw: InputHW, options: Options) -> Cost:
        (r,) = ranks
        tiles = self._options(options)["tiles"]
        if tiles is not None:
            return self._tiled_cost(module, r, tiles, input_hw)
        if isinstance(module, nn.Linear):
            n_in, n_out = module.in_features, module.out_features
            params = r * (n_in + n_out) + (n_out if module.bias is not None else 0)
            return Cost(params, linear_flops(n_in, r) + linear_flops(r, n_out))
        hw = require_input_hw(module, input_hw, self.name)
        g = ConvGeometry.of(module)  # type: ignore[arg-type]
        s, t = g.in_channels, g.out_channels
        out_hw = g.output_hw(hw)
        params = r * s * g.kernel_numel + r * t + (t if g.bias else 0)
        flops = conv2d_flops(s, r, g.kernel_size, out_hw) + conv2d_flops(r, t, (1, 1), out_hw)
        return Cost(params, flops)

    def _tiled_cost(
        self, module: nn.Module, r: int, tiles: tuple[int, int], input_hw: Sequence[int] | None
    ) -> Cost:
        m, n = _matrix(module.weight).shape  # type: ignore[arg-type]
        a, b = tiles
        bias = m if getattr(module, "bias", None) is not None else 0
        positions = 1
        if isinstance(module, nn.Conv2d):
            if isinstance(module.padding, str):
                raise ConfigError(
                    f"svd option tiles runs a conv as im2col, which needs numeric padding; the "
                    f"layer has padding={module.padding!r}: give explicit padding or drop tiles"
                )
            hw = require_input_hw(module, input_hw, self.name)
            oh, ow = ConvGeometry.of(module).output_hw(hw)
            positions = oh * ow
        flops = linear_flops(n, a * r, batch=positions) + linear_flops(b * r, m, batch=positions)
        return Cost(r * (a * n + b * m) + bias, flops)

    def rank_matrices(self, weight: torch.Tensor, options: Mapping[str, Any] | None = None) -> list[torch.Tensor]:
        """[W] for Linear, [W reshaped to T x (S*kh*kw)] for Conv2d."""
        if self._options(options)["tiles"] is not None:
            raise NotImplementedError(
                "svd with option tiles has one rank for many tile spectra, so spectrum-based "
                "rank selectors do not apply; use the fixed selector (ranks or fraction)"
            )
        return [_matrix(weight.detach())]

    def module_rank_matrices(
        self, module: nn.Module, options: Mapping[str, Any] | None = None
    ) -> list[torch.Tensor]:
        """``[W L]`` when the layer carries input statistics (output-energy spectrum)."""
        (mat,) = super().module_rank_matrices(module, options)
        m64 = mat.to(torch.float64)
        white = whitened(module, _kind(module), m64, for_selection=True)
        return [mat if white is None else whiten_columns(m64, white[0])]

    def ranks_from_matrix_ranks(
        self, module: nn.Module, matrix_ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> tuple[int, ...]:
        (hi,) = self.max_ranks(module, options)
        return (max(1, min(int(matrix_ranks[0]), hi)),)

    def _split(
        self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, split: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) with ``second @ first == u @ diag(s) @ vh``."""
        if split == "balanced":
            # equal norms per component: the rows of a whitened ``vh`` (mapped back by
            # L^-1) are not unit vectors, and factors of unequal scale make SGD unstable
            scale = (s / vh.norm(dim=1).clamp_min(torch.finfo(vh.dtype).tiny)).sqrt()
            return scale[:, None] * vh, u * (s / scale)
        if split == "first":
            return s[:, None] * vh, u
        return vh, u * s

    def factors(
        self,
        weight: torch.Tensor,
        ranks: Sequence[int],
        options: Mapping[str, Any] | None = None,
        whitening: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(first, second)`` matrices, ``(r, cols)`` and ``(rows, r)``, on the weight's device.

        With ``whitening = (L, L^-1)`` (:mod:`rankopt.compression.calibration`), the truncated SVD is
        of ``W L`` and ``first`` is multiplied by ``L^-1``: the rank-r matrix with the
        least output error on inputs of second moment ``L L^T`` (exact at full rank).
        """
        opts = self._options(options)
        mat = _matrix(weight.detach())
        (r,) = validate_weight_ranks(self.name, self.rank_names, ranks, (min(mat.shape),))
        if whitening is not None:
            mat = whiten_columns(mat.to(torch.float64), whitening[0].to(mat.device, torch.float64))
        u, s, vh = get_default_cache().svd(mat)
        dtype = compute_dtype(weight.dtype)
        u, s, vh = (x.to(device=weight.device, dtype=dtype) for x in (u[:, :r], s[:r], vh[:r]))
        if whitening is not None:
            vh = vh @ whitening[1].to(device=weight.device, dtype=dtype)
        if not all(torch.isfinite(x).all() for x in (u, s, vh)):
            raise DecompositionError(
                f"svd of a weight of shape {tuple(weight.shape)} produced non-finite factors; "
                "the weight itself may contain NaN/inf (check the training loss)"
            )
        return self._split(u, s, vh, opts["split"])

    def checked_build(self, module: nn.Module, ranks: tuple[int, ...], options: Options, initialize: bool) -> nn.Module:
        opts = self._options(options)
        (r,) = ranks
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        kw = {"device": weight.device, "dtype": weight.dtype}
        if opts["tiles"] is not None:
            return self._build_tiled(module, r, opts, initialize, kw)
        built: SVDLinear | SVDConv2d
        if isinstance(module, nn.Linear):
            built = SVDLinear(
                make_linear(module.in_features, r, bias=False, **kw),
                make_linear(r, module.out_features, bias=module.bias is not None, **kw),
            )
            first_layer, second_layer = built.linear_in, built.linear_out
        else:
            g = ConvGeometry.of(module)  # type: ignore[arg-type]
            built = SVDConv2d(
                make_conv(
                    g.in_channels, r, g.kernel_size, stride=g.stride, padding=g.padding,
                    dilation=g.dilation, **kw,
                ),
                make_conv(r, g.out_channels, (1, 1), bias=g.bias, **kw),
            )
            first_layer, second_layer = built.spatial, built.pointwise_out
        if initialize:
            white = whitened(module, _kind(module), weight.detach().to(torch.float64))
            first, second = self.factors(weight, (r,), options, whitening=white)
            with torch.no_grad():
                first_layer.weight.copy_(first.reshape(first_layer.weight.shape))
                second_layer.weight.copy_(second.reshape(second_layer.weight.shape))
            copy_bias(second_layer, module)
            correct_bias(second_layer.bias, module, built.reconstruct_weight(), _kind(module))
        return built

    def _build_tiled(
        self, module: nn.Module, r: int, opts: Mapping[str, Any], initialize: bool, kw: dict[str, Any]
    ) -> nn.Module:
        tiles = opts["tiles"]
        built: TiledSVDLinear | TiledSVDConv2d
        if isinstance(module, nn.Linear):
            built = TiledSVDLinear(module.out_features, module.in_features, r, tiles, module.bias is not None, **kw)
        else:
            built = TiledSVDConv2d(module, r, tiles, **kw)  # type: ignore[arg-type]
        if initialize:
            weight: torch.Tensor = module.weight  # type: ignore[assignment]
            mat = _matrix(weight.detach()).to(compute_dtype(weight.dtype))
            firsts, seconds = tiled_factors(mat, r, tiles, lambda u, s, vh: self._split(u, s, vh, opts["split"]))
            built.load_factors(firsts, seconds)
            if built.bias is not None:
                with torch.no_grad():
                    built.bias.copy_(module.bias)  # type: ignore[arg-type]
        return built

    def project(
        self, weight: torch.Tensor, ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        opts = self._options(options)
        mat = _matrix(weight.detach())
        tiles = check_tiles(opts["tiles"], mat.shape)
        if tiles is not None:
            (r,) = validate_weight_ranks(self.name, self.rank_names, ranks, (tile_max_rank(mat.shape, tiles),))
            approx = tiled_project(mat.to(compute_dtype(weight.dtype)), r, tiles)
            return approx.reshape(weight.shape).to(weight.dtype)
        (r,) = validate_weight_ranks(self.name, self.rank_names, ranks, (min(mat.shape),))
        u, s, vh = thin_svd(mat.to(compute_dtype(weight.dtype)))
        approx = (u[:, :r] * s[:r]) @ vh[:r]
        return approx.reshape(weight.shape).to(weight.dtype)


@hookimpl
def rankopt_decomposers() -> list[DecomposerInfo]:
    return [DecomposerInfo("svd", SVDDecomposer, SVDDecomposer.description)]
