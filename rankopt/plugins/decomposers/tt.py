"""Tensor-train (TT) decomposition of Conv2d layers after the HODEC scheme (Yin et al. 2022).

The channels are factorized, ``S = s_1 * ... * s_m`` and ``T = t_1 * ... * t_n``, and the
kernel ``W: (T, S, kh, kw)`` is reordered into the tensor
``X[s_1, ..., s_m, k, t_1, ..., t_n]`` (``k`` runs over the ``kh*kw`` kernel taps), whose
TT decomposition has ``m + n + 1`` cores joined by ``m + n`` bonds. It runs as HODEC's
efficient TT-conv (Algorithm 1):

* contract-in: ``m`` 1x1 convs, the j-th mapping ``(r_{j-1}, s_j) -> r_j`` while the
  input factors not yet contracted ride along with the spatial rows;
* a ``kh x kw`` conv ``r_m -> r_{m+1}`` with the original stride, padding and dilation;
* contract-out: ``n`` 1x1 convs, the i-th mapping ``r_{m+i} -> (t_i, r_{m+i+1})`` with the
  output factors already produced riding along with the batch;
* the original bias, added once at the end.

Ranks are the ``m + n`` bond ranks in chain order: ``r_1 .. r_m`` after each input factor
(``r_m`` feeds the conv core), ``r_{m+1}`` the conv core's output, then one after each
output factor but the last. With one factor on each side this is Tucker-2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tensorly.decomposition import tensor_train
from tensorly.tt_tensor import tt_to_tensor

from rankopt.compression.accounting import Cost, conv2d_flops
from rankopt.core.errors import ConfigError, DecompositionError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.decomposers._layers import (
    ConvGeometry,
    check_options,
    compute_dtype,
    make_conv,
    require_input_hw,
    tensorly_torch,
    validate_weight_ranks,
)
from rankopt.contract.decomposer import Decomposer, InputHW, Options
from rankopt.core.records import DecomposerInfo

__all__ = ["TTConv2d", "TTDecomposer", "balanced_factors", "tt_max_ranks", "tt_usable_ranks"]

DEFAULT_NUM_FACTORS = 2


def balanced_factors(n: int, parts: int = DEFAULT_NUM_FACTORS) -> list[int]:
    """``n`` as a product of up to ``parts`` factors as equal as its divisors allow, ascending.

    Each step takes the largest divisor not above the ``k``-th root of what is left;
    factors of 1 are dropped (a prime ``n`` stays whole): 64 -> [8, 8], 128 -> [8, 16],
    3 -> [3], 256 with 3 parts -> [4, 8, 8].
    """
    out: list[int] = []
    left = n
    for k in range(parts, 1, -1):
        root = left ** (1.0 / k)
        a = max(d for d in range(1, int(root + 1e-9) + 1) if left % d == 0)
        out.append(a)
        left //= a
    out.append(left)
    out = sorted(f for f in out if f > 1)
    return out or [n]


def tt_max_ranks(modes: Sequence[int]) -> tuple[int, ...]:
    """Bond ``b`` can carry at most ``min(prod(modes[:b]), prod(modes[b:]))``: exact TT-SVD."""
    return tuple(min(math.prod(modes[:b]), math.prod(modes[b:])) for b in range(1, len(modes)))


def tt_usable_ranks(modes: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """``ranks`` capped at what a TT of these modes can use given its neighbours.

    Core ``b`` is ``(r_{b-1}, mode_b, r_b)``: a bond carries at most
    ``r_{b-1} * mode_b`` (what its left core can span) and ``mode_{b+1} * r_{b+1}``
    (what its right core can). Rank beyond that would be zero slices that never get a
    gradient yet are counted as parameters, so :meth:`TTDecomposer.build` and
    :meth:`TTDecomposer.cost` use these capped ranks.
    """
    r = [1, *(int(x) for x in ranks), 1]
    changed = True
    while changed:  # one pass each way suffices; loop for clarity of the fixed point
        changed = False
        for b in range(1, len(r) - 1):
            cap = min(r[b - 1] * modes[b - 1], modes[b] * r[b + 1])
            if r[b] > cap:
                r[b], changed = cap, True
    return tuple(r[1:-1])


class TTConv2d(nn.Module):
    """A Conv2d in HODEC's TT form: contract-in 1x1 convs, a kxk conv core, contract-out 1x1 convs."""

    def __init__(
        self,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        in_cores: Sequence[nn.Conv2d],
        core: nn.Conv2d,
        out_cores: Sequence[nn.Conv2d],
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.in_factors = tuple(int(f) for f in in_factors)
        self.out_factors = tuple(int(f) for f in out_factors)
        self.in_channels = math.prod(self.in_factors)
        self.out_channels = math.prod(self.out_factors)
        self.in_cores = nn.ModuleList(in_cores)
        self.core = core
        self.out_cores = nn.ModuleList(out_cores)
        self.bias = nn.Parameter(bias) if bias is not None else None

    @property
    def ranks(self) -> tuple[int, ...]:
        outs = [c.out_channels // t for c, t in zip(self.out_cores, self.out_factors)][:-1]
        return (*(c.out_channels for c in self.in_cores), self.core.out_channels, *outs)

    def extra_repr(self) -> str:
        return f"in_factors={list(self.in_factors)}, out_factors={list(self.out_factors)}, ranks={list(self.ranks)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        z, rank, rest = x, 1, self.in_channels
        for conv, s in zip(self.in_cores, self.in_factors):
            # (n, r_{j-1}, s_j, s_{j+1}.., h, w): channels (r_{j-1}, s_j), the rest rides along in H
            rest //= s
            z = conv(z.reshape(n, rank * s, rest * h, w))
            rank = conv.out_channels
        z = self.core(z.reshape(n, rank, h, w))
        batch, rank, h2, w2 = z.shape
        for conv, t in zip(self.out_cores, self.out_factors):
            # (n, t_1.., t_{i-1}, r, h2, w2): the produced output factors ride along in the batch
            z = conv(z.reshape(batch, rank, h2, w2))
            batch, rank = batch * t, conv.out_channels // t
        z = z.reshape(n, self.out_channels, h2, w2)
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        return z

    def reconstruct_weight(self) -> torch.Tensor:
        """The full ``(T, S, kh, kw)`` kernel this module computes."""
        cores = _cores_from_module(self)
        kh, kw = self.core.kernel_size
        return _tensor_to_weight(
            _tt_contract(cores), self.out_channels, self.in_channels, (kh, kw)
        )


def _tt_contract(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    full = cores[0]
    for c in cores[1:]:
        full = torch.tensordot(full, c, dims=([full.dim() - 1], [0]))
    return full.reshape(full.shape[1:-1])


def _cores_from_module(m: TTConv2d) -> list[torch.Tensor]:
    cores = []
    rank = 1
    for conv, s in zip(m.in_cores, m.in_factors):
        cores.append(conv.weight[:, :, 0, 0].T.reshape(rank, s, conv.out_channels))
        rank = conv.out_channels
    c = m.core.weight  # (r_out, r_in, kh, kw)
    cores.append(c.reshape(c.shape[0], c.shape[1], -1).permute(1, 2, 0))
    rank = c.shape[0]
    for conv, t in zip(m.out_cores, m.out_factors):
        nxt = conv.out_channels // t
        cores.append(conv.weight[:, :, 0, 0].reshape(t, nxt, rank).permute(2, 0, 1))
        rank = nxt
    return cores


def _weight_to_tensor(weight: torch.Tensor, in_factors: Sequence[int], out_factors: Sequence[int]) -> torch.Tensor:
    """``W: (T, S, kh, kw)`` as ``X[s_1.., k, t_1..]``."""
    t, s = weight.shape[:2]
    x = weight.reshape(t, s, -1).permute(1, 2, 0)
    return x.reshape(*in_factors, x.shape[1], *out_factors)


def _tensor_to_weight(x: torch.Tensor, t: int, s: int, kernel: tuple[int, int]) -> torch.Tensor:
    return x.reshape(s, kernel[0] * kernel[1], t).permute(2, 0, 1).reshape(t, s, *kernel)


class TTDecomposer(Decomposer):
    """Tensor-train Conv2d with factorized channels (HODEC), initialized by TT-SVD.

    Options: ``in_factors`` and ``out_factors``, lists of integers whose products are
    ``S`` and ``T``. By default (:meth:`default_options`) each is split into
    ``DEFAULT_NUM_FACTORS = 2`` balanced factors (:func:`balanced_factors`; a prime
    channel count stays whole). The factorization fixes the number of ranks.

    Initialization is TT-SVD (Oseledets 2011) by TensorLy's ``tensor_train``. A bond
    cannot use more rank than ``r_{b-1} * mode_b`` or ``mode_{b+1} * r_{b+1}`` (its
    neighbours' ranks times the mode between): :meth:`build` and :meth:`cost` cap the
    ranks there (:func:`tt_usable_ranks`), so every counted parameter can learn; the
    built module's ``ranks`` are the capped ones.
    """

    name = "tt"
    description = "Tensor train with factorized channels (HODEC): contract-in, kxk core, contract-out"
    rank_names = ()  # m + n bond ranks; their number depends on the channel factorization
    module_types = (nn.Conv2d,)

    # -- options -----------------------------------------------------------------------
    def default_options(self, module: nn.Module) -> dict[str, Any]:
        self.check_module(module)
        return {
            "in_factors": balanced_factors(module.in_channels),  # type: ignore[arg-type]
            "out_factors": balanced_factors(module.out_channels),  # type: ignore[arg-type]
        }

    def _factors(
        self, in_channels: int, out_channels: int, options: Mapping[str, Any] | None
    ) -> tuple[list[int], list[int]]:
        defaults = {"in_factors": balanced_factors(in_channels), "out_factors": balanced_factors(out_channels)}
        opts = check_options(options, defaults, self.name)
        out = []
        for key, channels in (("in_factors", in_channels), ("out_factors", out_channels)):
            f = opts[key]
            if (
                not isinstance(f, (list, tuple))
                or not f
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in f)
            ):
                raise ConfigError(f"tt option {key} must be a non-empty list of positive integers, got {f!r}")
            if math.prod(f) != channels:
                raise ConfigError(
                    f"tt option {key}={list(f)} multiplies to {math.prod(f)}, but the layer has "
                    f"{channels} {key.split('_')[0]}put channels; give factors whose product is "
                    f"{channels}, e.g. {balanced_factors(channels)}"
                )
            out.append([int(v) for v in f])
        return out[0], out[1]

    def _modes(self, weight_shape: Sequence[int], options: Mapping[str, Any] | None) -> tuple[list[int], list[int], list[int]]:
        t, s, kh, kw = weight_shape
        fin, fout = self._factors(s, t, options)
        return fin, fout, [*fin, kh * kw, *fout]

    def max_ranks(self, module: nn.Module, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        """Per bond ``min(prod(modes[:b]), prod(modes[b:]))``, all usable together.

        Smaller ranks on one bond lower what its neighbours can use
        (:func:`tt_usable_ranks`); larger requested ranks are accepted and capped.
        """
        self.check_module(module)
        return tt_max_ranks(self._modes(module.weight.shape, options)[2])  # type: ignore[union-attr]

    # -- accounting --------------------------------------------------------------------
    def checked_cost(self, module: nn.Module, ranks: tuple[int, ...], input_hw: InputHW, options: Options) -> Cost:
        hw = require_input_hw(module, input_hw, self.name)
        g = ConvGeometry.of(module)  # type: ignore[arg-type]
        fin, fout, modes = self._modes(module.weight.shape, options)  # type: ignore[union-attr]
        r = [1, *tt_usable_ranks(modes, ranks), 1]
        m = len(fin)
        out_hw = g.output_hw(hw)
        params, flops = (g.out_channels if g.bias else 0), 0
        rest = g.in_channels
        for j, s in enumerate(fin):
            rest //= s
            params += r[j] * s * r[j + 1]
            flops += conv2d_flops(r[j] * s, r[j + 1], (1, 1), (rest * hw[0], hw[1]))
        params += r[m] * g.kernel_numel * r[m + 1]
        flops += conv2d_flops(r[m], r[m + 1], g.kernel_size, out_hw)
        batch = 1
        for i, t in enumerate(fout):
            a, b = r[m + 1 + i], r[m + 2 + i]
            params += a * t * b
            flops += conv2d_flops(a, t * b, (1, 1), out_hw, batch=batch)
            batch *= t
        return Cost(params, flops)

    # -- the decomposition -------------------------------------------------------------
    def rank_matrices(self, weight: torch.Tensor, options: Mapping[str, Any] | None = None) -> list[torch.Tensor]:
        """The unfolding at each bond: ``X`` reshaped to ``prod(modes[:b]) x prod(modes[b:])``."""
        fin, fout, modes = self._modes(weight.shape, options)
        x = _weight_to_tensor(weight.detach(), fin, fout)
        return [x.reshape(math.prod(modes[:b]), -1) for b in range(1, len(modes))]

    def ranks_from_matrix_ranks(
        self, module: nn.Module, matrix_ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> tuple[int, ...]:
        largest = self.max_ranks(module, options)
        modes = self._modes(module.weight.shape, options)[2]  # type: ignore[union-attr]
        return tt_usable_ranks(modes, [max(1, min(int(r), hi)) for r, hi in zip(matrix_ranks, largest)])

    def cores(
        self, weight: torch.Tensor, ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> list[torch.Tensor]:
        """TT-SVD cores ``(r_{b-1}, mode_b, r_b)`` of the reordered kernel at the usable ranks."""
        if weight.dim() != 4:
            raise ConfigError(
                f"tt works on 4-d conv kernels (T, S, kh, kw), got a weight of shape {tuple(weight.shape)}"
            )
        fin, fout, modes = self._modes(weight.shape, options)
        ranks = validate_weight_ranks(
            self.name, [f"r{i + 1}" for i in range(len(modes) - 1)], ranks, tt_max_ranks(modes)
        )
        ranks = tt_usable_ranks(modes, ranks)
        x = _weight_to_tensor(weight.detach().to(compute_dtype(weight.dtype)), fin, fout)
        with tensorly_torch():
            cores = list(tensor_train(x, rank=[1, *ranks, 1]))
        full = [1, *ranks, 1]
        padded = []
        for b, c in enumerate(cores):
            if not torch.isfinite(c).all():
                raise DecompositionError(
                    f"TT-SVD of a kernel of shape {tuple(weight.shape)} produced non-finite cores; "
                    "the weight itself may contain NaN/inf (check the training loss)"
                )
            pad = (0, full[b + 1] - c.shape[2], 0, 0, 0, full[b] - c.shape[0])
            padded.append(F.pad(c, pad) if any(pad) else c)
        return padded

    def checked_build(self, module: nn.Module, ranks: tuple[int, ...], options: Options, initialize: bool) -> nn.Module:
        g = ConvGeometry.of(module)  # type: ignore[arg-type]
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        fin, fout, modes = self._modes(weight.shape, options)
        ranks = tt_usable_ranks(modes, ranks)
        kw = {"device": weight.device, "dtype": weight.dtype}
        r = [1, *ranks, 1]
        m = len(fin)
        in_cores = [make_conv(r[j] * s, r[j + 1], (1, 1), **kw) for j, s in enumerate(fin)]
        core = make_conv(
            r[m], r[m + 1], g.kernel_size, stride=g.stride, padding=g.padding, dilation=g.dilation, **kw
        )
        out_cores = [make_conv(r[m + 1 + i], t * r[m + 2 + i], (1, 1), **kw) for i, t in enumerate(fout)]
        bias = torch.zeros(g.out_channels, **kw) if g.bias else None
        built = TTConv2d(fin, fout, in_cores, core, out_cores, bias)
        if initialize:
            cores = self.cores(weight, ranks, options)
            with torch.no_grad():
                for conv, c in zip(built.in_cores, cores[:m]):
                    conv.weight.copy_(c.reshape(-1, c.shape[2]).T[:, :, None, None])
                c = cores[m]  # (r_m, kh*kw, r_{m+1})
                built.core.weight.copy_(c.permute(2, 0, 1).reshape(built.core.weight.shape))
                for conv, c in zip(built.out_cores, cores[m + 1 :]):
                    conv.weight.copy_(c.permute(1, 2, 0).reshape(-1, c.shape[0])[:, :, None, None])
                if built.bias is not None:
                    built.bias.copy_(module.bias)  # type: ignore[arg-type]
        return built

    def project(
        self, weight: torch.Tensor, ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        cores = self.cores(weight, ranks, options)
        t, s, kh, kw = weight.shape
        with tensorly_torch():
            x = tt_to_tensor(cores)
        return _tensor_to_weight(x, t, s, (kh, kw)).to(weight.dtype)


@hookimpl
def rankopt_decomposers() -> list[DecomposerInfo]:
    return [DecomposerInfo("tt", TTDecomposer, TTDecomposer.description)]
