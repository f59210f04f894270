"""CP (CANDECOMP/PARAFAC) decomposition of Conv2d layers (Lebedev et al. 2015, via TensorLy).

A kernel ``W: (T, S, kh, kw)`` is approximated by ``R`` rank-one terms,
``W ~= sum_r a_T[:, r] o a_S[:, r] o a_h[:, r] o a_w[:, r]``, which runs as four
convolutions: a 1x1 conv ``S -> R``, a depthwise ``kh x 1`` conv and a depthwise ``1 x kw``
conv (stride, padding and dilation of the original on their own axis), and a 1x1 conv
``R -> T`` with the original bias. Ranks: ``(R,)``.

'same' padding, even kernels included, is exact: PyTorch pads a ``kh x 1`` conv given
``padding='same'`` by the original's (possibly asymmetric) amount along H and not at
all along W, and the ``1 x kw`` conv the other way round.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorly as tl
import torch
import torch.nn as nn
from tensorly.cp_tensor import CPTensor, cp_to_tensor
from tensorly.decomposition import parafac

from rankopt.compression.accounting import Cost, conv2d_flops, conv2d_output_hw
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
    validate_weight_ranks,
)
from rankopt.contract.decomposer import InputHW, Options
from rankopt.plugins.decomposers._channel_modes import ChannelModesDecomposer
from rankopt.core.records import DecomposerInfo
from rankopt.compression.spectral import get_default_cache
from rankopt.plugins.decomposers._cp_guard import (  # noqa: F401  (EXACT_FIT: re-exported)
    EXACT_FIT,
    ALSRun,
    term_ratio,
)

__all__ = ["ALSRun", "CPConv2d", "CPDecomposer", "cp_max_rank", "term_ratio"]

INITS = ("svd", "random")
MAX_RELATIVE_ERROR = 1.0  # worse than approximating W by zero: the ALS went astray
# ridges tried, smallest first, on the unit-norm kernel when plain ALS is degenerate: the
# first that bounds the terms wins (on a random 8x6x3x3 kernel at R=27, 1e-4 bounded them
# and even lowered the error, 0.036 -> 0.028; on a border-rank kernel 1e-3 costs 0.004 -> 0.027)
RIDGES = (1e-5, 1e-4, 1e-3, 1e-2)
# TensorLy's default MTTKRP materializes the Khatri-Rao product of all factors but one,
# prod(shape) / shape[mode] x R entries: 650M for a 512x512x3x3 kernel at R=827. Above
# this many entries, run its einsum backend instead (contracted pairwise along the
# path opt_einsum finds, never larger than the kernel times R / min(shape)).
KHATRI_RAO_LIMIT = 1 << 22


class CPConv2d(nn.Sequential):
    """A Conv2d in CP form: 1x1 ``S -> R``, depthwise ``kh x 1``, depthwise ``1 x kw``, 1x1 ``R -> T``."""

    def __init__(
        self, pointwise_in: nn.Conv2d, depthwise_h: nn.Conv2d, depthwise_w: nn.Conv2d, pointwise_out: nn.Conv2d
    ) -> None:
        super().__init__(
            OrderedDict(
                pointwise_in=pointwise_in,
                depthwise_h=depthwise_h,
                depthwise_w=depthwise_w,
                pointwise_out=pointwise_out,
            )
        )

    @property
    def rank(self) -> int:
        return self.pointwise_in.out_channels  # type: ignore[return-value]

    def reconstruct_weight(self) -> torch.Tensor:
        """The full ``(T, S, kh, kw)`` kernel this module computes."""
        a_s = self.pointwise_in.weight[:, :, 0, 0]  # (R, S)
        a_h = self.depthwise_h.weight[:, 0, :, 0]  # (R, kh)
        a_w = self.depthwise_w.weight[:, 0, 0, :]  # (R, kw)
        a_t = self.pointwise_out.weight[:, :, 0, 0]  # (T, R)
        return torch.einsum("tr,rs,rh,rw->tshw", a_t, a_s, a_h, a_w)


def cp_max_rank(shape: Sequence[int]) -> int:
    """``prod(shape) // max(shape)``: every tensor of this shape has a CP rank at most this.

    (Write it as a sum of its fibres along the longest mode, one rank-one term per
    index of the other modes.) Larger ranks never reconstruct better.
    """
    return math.prod(shape) // max(shape)


@contextlib.contextmanager
def _mttkrp_for(shape: Sequence[int], rank: int) -> Iterator[None]:
    """TensorLy's tensor-algebra backend suited to CP-ALS of ``shape`` at ``rank`` (this thread)."""
    largest_khatri_rao = math.prod(shape) // min(shape) * rank
    if largest_khatri_rao > KHATRI_RAO_LIMIT and torch.backends.opt_einsum.is_available():
        with tl.tenalg.backend_context("einsum", local_threadsafe=True):
            yield
    else:
        yield


def _axis_geometry(g: ConvGeometry) -> tuple[dict[str, Any], dict[str, Any]]:
    """Conv2d keyword arguments of the depthwise ``kh x 1`` and ``1 x kw`` convs."""
    kh, sh, ph, dh = g.axis(0)
    kw, sw, pw, dw = g.axis(1)
    vertical = {
        "kernel_size": (kh, 1),
        "stride": (sh, 1),
        "padding": ph if isinstance(ph, str) else (ph, 0),
        "dilation": (dh, 1),
    }
    horizontal = {
        "kernel_size": (1, kw),
        "stride": (1, sw),
        "padding": pw if isinstance(pw, str) else (0, pw),
        "dilation": (1, dw),
    }
    return vertical, horizontal


class CPDecomposer(ChannelModesDecomposer):
    """CP decomposition for Conv2d by TensorLy's ``parafac`` (ALS).

    Options: ``init`` (``"svd"``, default, or ``"random"``), ``n_iter_max`` (200),
    ``tol`` (1e-8, on the change of the relative reconstruction error; TensorLy's
    default), ``random_state`` (0; seeds the random columns that the SVD init adds when
    ``R`` exceeds a mode's size, and the random restart), ``max_term_ratio`` (3.0, the
    degeneracy bound below).

    CP-ALS can diverge. The result is checked: non-finite factors or a reconstruction
    error larger than ``||W||`` (worse than zero) count as a failure; the decomposition
    is then retried once from a seeded random start, and if that fails too a
    :class:`~rankopt.core.errors.DecompositionError` says what happened. Garbage is never
    returned.

    Low-rank CP approximation is ill-posed, and ALS can also degenerate: rank-one terms
    that grow while cancelling each other (a kernel of border rank 2 but rank 4 does this at
    R=2: the error falls only as the terms grow). A good high-rank fit also has large
    interacting terms (trained ResNet-20 kernels: 7-16 times the kernel's norm at R from a
    quarter of :func:`cp_max_rank` up), so size alone is no sign. The guard reads the run's
    iterations (:class:`ALSRun`): it suspects degeneracy when :func:`term_ratio` exceeds
    ``max_term_ratio`` (option, default 3.0) **and** still grew by more than 1 % over the last
    half of the iterations (a converged fit's terms settle). A suspect run is compared with
    ALS rerun from the same start with a ridge (``l2_reg`` 1e-5, 1e-4, 1e-3, then 1e-2 on the
    unit-norm kernel; the first whose terms are within the bound): the ridge run replaces it
    where it fits at least as well, or where the error fell in step with the terms' growth
    (``error * ratio**k`` about constant, 1 <= k <= 10: the border-rank approach, where a lower
    error is only had with ever larger terms); otherwise plain ALS stays, being the better
    fit. A border-rank run that no ridge bounds is retried from the random start, then
    :class:`~rankopt.core.errors.DecompositionError` (:func:`rankopt.compress` adds the layer).
    ``benchmarks/bench_cp_guard.py`` records the guard on trained kernels: it never takes a
    fallback that fits worse than plain ALS there (the term-ratio-only guard did on 7 of 36
    cases, up to 143x the error).

    The rank magnitudes are balanced: every rank-one term's scale is spread equally
    over its four factors (the ALS leaves them arbitrary), so no layer of the
    factorized module starts with huge or tiny weights.

    :meth:`rank_matrices` gives the mode-1 and mode-0 unfoldings (as Tucker-2); a
    selector's two ranks become ``R = max(r_in, r_out)`` (:meth:`ranks_from_matrix_ranks`),
    the smallest R whose factor matrices can span both channel subspaces.

    ``max_ranks`` is :func:`cp_max_rank`, the rank at which any kernel has an exact CP
    form (not the smaller rank where the factorized layer stops being cheaper). CP-ALS
    is not a projection: ``project`` is not idempotent in general (low-rank CP
    approximation is ill-posed, and ALS finds a local optimum).
    """

    name = "cp"
    description = "CP: 1x1, depthwise kx1, depthwise 1xk, 1x1 (Lebedev et al.); ranks (R,)"
    rank_names = ("R",)
    module_types = (nn.Conv2d,)
    DEFAULT_OPTIONS: Mapping[str, Any] = {
        "init": "svd", "n_iter_max": 200, "tol": 1e-8, "random_state": 0, "max_term_ratio": 3.0,
    }
    # ALS is iterative: a kernel of known CP rank is recovered to ~1e-4, not to round-off
    contract_rtol = 1e-4
    # ALS finds a local optimum, so re-projecting a projection may move it (see above)
    projection_idempotent = False

    def _options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        opts = check_options(options, self.DEFAULT_OPTIONS, self.name)
        if opts["init"] not in INITS:
            raise ConfigError(f"cp option init must be one of {list(INITS)}, got {opts['init']!r}")
        n = opts["n_iter_max"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"cp option n_iter_max must be an integer >= 1, got {n!r}")
        tol = opts["tol"]
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
            raise ConfigError(f"cp option tol must be a number >= 0, got {tol!r}")
        limit = opts["max_term_ratio"]
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise ConfigError(f"cp option max_term_ratio must be a number > 0, got {limit!r}")
        seed = opts["random_state"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"cp option random_state must be an integer >= 0, got {seed!r}")
        return opts

    def max_ranks(self, module: nn.Module, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        self.check_module(module)
        return (cp_max_rank(module.weight.shape),)  # type: ignore[union-attr]

    def checked_cost(self, module: nn.Module, ranks: tuple[int, ...], input_hw: InputHW, options: Options) -> Cost:
        (r,) = ranks
        hw = require_input_hw(module, input_hw, self.name)
        g = ConvGeometry.of(module)  # type: ignore[arg-type]
        s, t = g.in_channels, g.out_channels
        (kh, kw) = g.kernel_size
        vertical, horizontal = _axis_geometry(g)
        hw_v = conv2d_output_hw(hw, **vertical)
        hw_h = conv2d_output_hw(hw_v, **horizontal)
        params = r * (s + kh + kw + t) + (t if g.bias else 0)
        flops = (
            conv2d_flops(s, r, (1, 1), hw)
            + conv2d_flops(r, r, (kh, 1), hw_v, groups=r)
            + conv2d_flops(r, r, (1, kw), hw_h, groups=r)
            + conv2d_flops(r, t, (1, 1), hw_h)
        )
        return Cost(params, flops)

    def ranks_from_matrix_ranks(self, module: nn.Module, matrix_ranks: Sequence[int], options: Options = None) -> tuple[int, ...]:
        (hi,) = self.max_ranks(module, options)
        return (max(1, min(max(int(r) for r in matrix_ranks), hi)),)

    # -- the decomposition -------------------------------------------------------------
    def factors(
        self, weight: torch.Tensor, ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Balanced ``(a_T, a_S, a_h, a_w)``, each ``(dim, R)``, on the weight's device."""
        opts = self._options(options)
        if weight.dim() != 4:
            raise ConfigError(
                f"cp works on 4-d conv kernels (T, S, kh, kw), got a weight of shape {tuple(weight.shape)}"
            )
        (r,) = validate_weight_ranks(self.name, self.rank_names, ranks, (cp_max_rank(weight.shape),))
        w = weight.detach().to(compute_dtype(weight.dtype))
        norm = torch.linalg.vector_norm(w)
        if norm == 0:
            return tuple(w.new_zeros(n, r) for n in w.shape)  # type: ignore[return-value]
        inits = [opts["init"]] + (["random"] if opts["init"] != "random" else [])
        limit = opts["max_term_ratio"]
        failures = []
        for init in inits:
            plain = self._als(w, norm, r, init, 0.0, opts)
            if isinstance(plain, str):
                failures.append(plain)  # a diverged run: try the next start, not a ridge
                continue
            if not plain.suspect(limit):
                return _balance(plain.weights, plain.factors)
            failures.append(plain.describe_degenerate(limit))
            # terms above the bound and still growing: a ridge-bounded run decides
            for ridge in RIDGES:
                bounded = self._als(w, norm, r, init, ridge, opts)
                if isinstance(bounded, str) or bounded.ratio > limit:
                    failures.append(bounded if isinstance(bounded, str) else bounded.describe_degenerate(limit))
                    continue
                if bounded.rel <= plain.rel or plain.bought_by_growth():
                    return _balance(bounded.weights, bounded.factors)
                break
            if not plain.bought_by_growth():
                # the error stalled while the terms drifted, and no bounded run fits as well:
                # plain ALS is the better fit, not a degenerate one
                return _balance(plain.weights, plain.factors)
        raise DecompositionError(
            f"CP decomposition of a kernel of shape {tuple(w.shape)} at rank R={r} diverged "
            f"({'; '.join(failures)}); try a smaller R, more iterations (option n_iter_max), "
            "another random_state, or the 'tucker2' decomposer"
        )

    def _als(
        self, w: torch.Tensor, norm: torch.Tensor, r: int, init: str, ridge: float, opts: Mapping[str, Any]
    ) -> ALSRun | str:
        """One checked ALS run: an :class:`ALSRun`, or why it failed.

        The ridge run works on ``w / ||w||`` so that ``l2_reg`` (added to the normal
        equations) has the same effect whatever the kernel's scale. The terms' norm is
        recorded at every iteration (a TensorLy callback) for the growth test.
        """
        what = f"init={init!r}" + (f", l2_reg={ridge:g}" if ridge else "")
        target = w / norm if ridge else w
        scale = norm / norm if ridge else norm
        history: list[tuple[float, float]] = []

        def record(cp: CPTensor, rel_error: float) -> None:
            weights, factors = cp
            ones = factors[0].new_ones(r) if weights is None else weights
            history.append((term_ratio(ones, factors, scale), float(rel_error)))

        try:
            with tensorly_torch(), _mttkrp_for(w.shape, r), warnings.catch_warnings():
                # R above a mode's size: TensorLy says it pads the SVD init with random columns
                warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
                start = _svd_init(target, r, opts["random_state"]) if init == "svd" else "random"
                weights, factors = parafac(
                    # tol 0 would leave TensorLy's per-iteration error (the callback's) unset
                    target, r, n_iter_max=opts["n_iter_max"], init=start, tol=opts["tol"] or 1e-300,
                    random_state=opts["random_state"], normalize_factors=False, l2_reg=ridge,
                    callback=record,
                )
                if ridge:
                    weights = weights * norm
                approx = cp_to_tensor((weights, factors))
        except (RuntimeError, ValueError, ArithmeticError) as exc:  # e.g. a singular solve
            return f"{what}: {type(exc).__name__}: {exc}"
        if not all(torch.isfinite(f).all() for f in factors) or not torch.isfinite(weights).all():
            return f"{what}: non-finite factors (NaN/inf)"
        rel = float(torch.linalg.vector_norm(w - approx) / norm)
        if not math.isfinite(rel) or rel > MAX_RELATIVE_ERROR:
            return f"{what}: relative reconstruction error {rel:.3g} > {MAX_RELATIVE_ERROR}"
        ratio = term_ratio(weights, list(factors), norm)
        return ALSRun(what, weights, list(factors), rel, ratio, tuple(history))

    def checked_build(self, module: nn.Module, ranks: tuple[int, ...], options: Options, initialize: bool) -> nn.Module:
        self._options(options)
        (r,) = ranks
        g = ConvGeometry.of(module)  # type: ignore[arg-type]
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        kw = {"device": weight.device, "dtype": weight.dtype}
        vertical, horizontal = _axis_geometry(g)
        built = CPConv2d(
            make_conv(g.in_channels, r, (1, 1), **kw),
            make_conv(r, r, groups=r, **vertical, **kw),
            make_conv(r, r, groups=r, **horizontal, **kw),
            make_conv(r, g.out_channels, (1, 1), bias=g.bias, **kw),
        )
        if initialize:
            # data-aware (rankopt.compression.calibration): ALS on the kernel with its input channels
            # whitened, the input factor mapped back (the Tucker-2 rule, on CP's init)
            white = whitened(module, "channel", weight.detach().to(torch.float64))
            target = weight if white is None else whiten_input_channels(
                weight.detach().to(torch.float64), white[0]).to(compute_dtype(weight.dtype))
            a_t, a_s, a_h, a_w = self.factors(target, (r,), options)
            if white is not None:
                a_s = unwhiten_input_factor(a_s.to(torch.float64), white[1]).to(a_t.dtype)
            with torch.no_grad():
                built.pointwise_in.weight.copy_(a_s.T[:, :, None, None])
                built.depthwise_h.weight.copy_(a_h.T[:, None, :, None])
                built.depthwise_w.weight.copy_(a_w.T[:, None, None, :])
                built.pointwise_out.weight.copy_(a_t[:, :, None, None])
            self.set_output_bias(built, module)
        return built

    def project(
        self, weight: torch.Tensor, ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        a_t, a_s, a_h, a_w = self.factors(weight, ranks, options)
        return torch.einsum("tr,sr,hr,wr->tshw", a_t, a_s, a_h, a_w).to(weight.dtype)

    def warm_project(
        self,
        weight: torch.Tensor,
        ranks: Sequence[int],
        options: Mapping[str, Any] | None = None,
        start: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``project`` continued from ``start`` (the factors of an earlier projection):
        ``(projection, its factors)``, the factors to pass as the next ``start``.

        For iterative callers such as ADMM, whose projections of slowly moving tensors
        must stay consistent: ALS from scratch may land in another local optimum each
        time (on the digits model at R=55, consecutive cold projections kept the ADMM
        residual at 0.2; warm-started they follow W to under 0.01). ``start=None`` is the
        cold, guarded :meth:`factors`; a warm run that fails its checks (non-finite, or
        worse than zero) falls back to it.
        """
        if start is None:
            factors = self.factors(weight, ranks, options)
        else:
            factors = self._warm_factors(weight, ranks, options, start) or self.factors(weight, ranks, options)
        projection = torch.einsum("tr,sr,hr,wr->tshw", *factors).to(weight.dtype)
        return projection, factors

    def _warm_factors(
        self, weight: torch.Tensor, ranks: Sequence[int], options: Mapping[str, Any] | None,
        start: Sequence[torch.Tensor],
    ) -> tuple[torch.Tensor, ...] | None:
        opts = self._options(options)
        (r,) = validate_weight_ranks(self.name, self.rank_names, ranks, (cp_max_rank(weight.shape),))
        w = weight.detach().to(compute_dtype(weight.dtype))
        if len(start) != 4 or any(f.shape != (n, r) for f, n in zip(start, w.shape)):
            return None  # not factors of this kernel at this rank: start cold
        norm = torch.linalg.vector_norm(w)
        if norm == 0:
            return None
        try:
            with tensorly_torch(), _mttkrp_for(w.shape, r):
                init = CPTensor((None, [f.detach().to(device=w.device, dtype=w.dtype) for f in start]))
                weights, factors = parafac(
                    w, r, n_iter_max=opts["n_iter_max"], init=init, tol=opts["tol"],
                    normalize_factors=False,
                )
        except (RuntimeError, ValueError, ArithmeticError):
            return None
        if not all(torch.isfinite(f).all() for f in factors) or not torch.isfinite(weights).all():
            return None
        approx = torch.einsum("r,tr,sr,hr,wr->tshw", weights, *factors)
        if not float(torch.linalg.vector_norm(w - approx) / norm) <= MAX_RELATIVE_ERROR:
            return None
        return _balance(weights, list(factors))


def _svd_init(w: torch.Tensor, rank: int, seed: int) -> CPTensor:
    """TensorLy's ``init="svd"`` start, with the channel-mode SVDs from the spectral cache.

    Written out because TensorLy's own runs wide LAPACK SVDs (seconds for a 512x512x3x3
    kernel) and cannot share them: the mode-0 and mode-1 unfoldings are the ones Tucker-2
    and the rank selectors decompose. As in TensorLy: the leading left singular vectors
    of each unfolding, mode 0 scaled by the singular values, and uniform random columns
    (seeded) where ``rank`` exceeds a mode's size.
    """
    rng = np.random.RandomState(seed)
    cache = get_default_cache()
    factors = []
    for mode, dim in enumerate(w.shape):
        unfolding = mode_unfolding(w, mode)
        if mode < 2:
            u, s, _ = cache.svd(unfolding)
        else:  # kh x (T*S*kw): the SVD of the tall transpose is instant
            _, s, vh = torch.linalg.svd(unfolding.T, full_matrices=False)
            u = vh.T
        u = u[:, :rank].to(device=w.device, dtype=w.dtype)
        if mode == 0:
            u = u * s[: u.shape[1]].to(device=w.device, dtype=w.dtype)
        if dim < rank:
            extra = torch.from_numpy(rng.random_sample((dim, rank - dim)))
            u = torch.cat([u, extra.to(device=w.device, dtype=w.dtype)], dim=1)
        factors.append(u)
    return CPTensor((None, factors))


def _balance(weights: torch.Tensor, factors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Spread each rank-one term's magnitude equally over the factors (same tensor)."""
    norms = [torch.linalg.vector_norm(f, dim=0) for f in factors]
    scale = weights.abs() * torch.stack(norms).prod(dim=0)
    share = scale.pow(1.0 / len(factors))
    out = []
    for i, (f, n) in enumerate(zip(factors, norms)):
        unit = f / torch.where(n > 0, n, torch.ones_like(n))
        out.append(unit * share * (weights.sign() if i == 0 else 1))
    return tuple(out)


@hookimpl
def rankopt_decomposers() -> list[DecomposerInfo]:
    return [DecomposerInfo("cp", CPDecomposer, CPDecomposer.description)]
