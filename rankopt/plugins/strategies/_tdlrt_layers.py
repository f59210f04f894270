"""A Conv2d trained in Tucker-2 format with the rank-adaptive integrator of TDLRT.

The kernel is ``W = C x_0 U_out x_1 U_in`` (Tucker-2 over the output and input
channel modes; the spatial modes stay full), with orthonormal ``U_out`` (T x r_out),
``U_in`` (S x r_in) and core ``C`` (r_out, r_in, kh, kw). One step of the
rank-adaptive BUG integrator of Zangrando et al., "Rank-adaptive spectral pruning of
convolutional layers during training" (``seeds/003_*``), from an ambient update
``D`` of the kernel (``-lr * grad W`` for plain SGD):

1. K-step, per mode i: with ``Mat_i(C)^T = Q_i S_i^T`` (QR), the direction of the
   K_i = U_i S_i^T update is ``Mat_i(D x_{j!=i} U_j^T) Q_i``; augment the basis
   ``U~_i = orth([U_i, that direction])`` (at most 2 r_i columns).
2. S-step: the core in the augmented bases,
   ``C~ = C x_i (U~_i^T U_i) + D x_i U~_i^T``.
3. Truncation: per mode, the SVD of ``Mat_i(C~)``; keep the fewest singular values
   whose discarded tail has norm ``<= tau * ||C~||_F``, clamped to
   ``[min_rank, max_rank_i]``; ``U_i = U~_i P_i``, ``C = C~ x_i P_i^T`` (truncated HOSVD).

The core step starts at the same kernel as the K-steps (``C~ x U~ = W``), so one
forward/backward per batch gives every gradient the step needs. ``D`` comes from
two places, one per mode of the layer:

* ``factored=True`` (the paper; what the ``tdlrt`` strategy uses): forward and backward
  run through the three factor convolutions (1x1 by ``U_in^T``, the core, 1x1 by
  ``U_out``) and the backward leaves only the factor-sized projections of the kernel's
  gradient ``G`` the steps need (:mod:`._tdlrt_factored`); the full kernel is never
  built, in training or at eval. ``D = -lr * G`` (the paper's descent step, plain
  SGD): :meth:`integrate` takes ``lr``, the loop's current learning rate.
* ``factored=False``: a zero-initialized full-size parameter ``delta`` is added to
  the reconstructed kernel; the shared loop's optimizer (momentum, schedule,
  clipping) proposes ``D`` on it and :meth:`integrate` folds it into the factors and
  resets it. Dense memory and compute; needed by ``carry=True``, which keeps the
  truncated remainder in ``delta``. With plain SGD both modes compute the same steps
  (tests/test_strategy_tdlrt.py checks outputs, gradients and steps agree).

The factors are buffers, since their shapes change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankopt.core.errors import ConfigError, DecompositionError
from rankopt.plugins.strategies._tdlrt_factored import (
    FactoredTuckerConv, StepGradients, augment, core_row_bases, tucker_conv,
)

__all__ = ["TuckerTrainingConv2d", "tucker2_convs", "truncation_rank"]


def truncation_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """The fewest leading singular values whose discarded tail has L2 norm <= ``threshold``."""
    squares = singular_values.double() ** 2
    tails = torch.flip(torch.cumsum(torch.flip(squares, [0]), 0), [0])  # tails[r] = sum_{j>=r}
    return int((tails > threshold**2).sum())


def tucker2_convs(module: nn.Module) -> list[nn.Conv2d]:
    """The three convs (1x1 in, kxk core, 1x1 out) of a module built by the ``tucker2`` decomposer."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != 3:
        raise DecompositionError(
            f"expected the tucker2 decomposer to build 3 convolutions (1x1, kxk core, 1x1), "
            f"found {len(convs)} in {type(module).__name__}; TDLRT cannot map its factors"
        )
    return convs


class TuckerTrainingConv2d(nn.Module):
    """A Conv2d whose kernel is kept in Tucker-2 format and updated by the TDLRT integrator.

    Build it with :meth:`from_factors`; after training, :meth:`to_tucker2` gives the
    module the ``tucker2`` decomposer builds at the learned ranks, filled with them.
    """

    u_out: torch.Tensor
    u_in: torch.Tensor
    core: torch.Tensor

    def __init__(
        self,
        conv: nn.Conv2d,
        core: torch.Tensor,
        u_out: torch.Tensor,
        u_in: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        max_ranks: Sequence[int],
        min_rank: int = 1,
        factored: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.max_rank_in, self.max_rank_out = (int(r) for r in max_ranks)
        self.min_rank = int(min_rank)
        self.register_buffer("core", core.detach().clone())
        self.register_buffer("u_out", u_out.detach().clone())
        self.register_buffer("u_in", u_in.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.factored = bool(factored)
        self._pending: StepGradients | None = None  # the last backward's step gradients
        if self.factored:
            if isinstance(conv.padding, str) or conv.groups != 1 or conv.padding_mode != "zeros":
                raise ConfigError(
                    f"TDLRT's factored training needs numeric padding, groups=1 and zero padding "
                    f"mode; got padding={conv.padding!r}, groups={conv.groups}, "
                    f"padding_mode={conv.padding_mode!r}"
                )
            self.delta = None
        else:
            self.delta = nn.Parameter(torch.zeros(
                conv.out_channels, conv.in_channels, *self.kernel_size,
                dtype=core.dtype, device=core.device,
            ))

    @classmethod
    def from_factors(
        cls,
        conv: nn.Conv2d,
        core: torch.Tensor,
        u_out: torch.Tensor,
        u_in: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        max_ranks: Sequence[int],
        min_rank: int = 1,
        factored: bool = False,
    ) -> TuckerTrainingConv2d:
        """A layer from any Tucker-2 factors; the bases are orthonormalized (QR) first."""
        q_out, r_out = torch.linalg.qr(u_out, mode="reduced")
        q_in, r_in = torch.linalg.qr(u_in, mode="reduced")
        core = torch.einsum("abkl,xa,yb->xykl", core, r_out, r_in)
        return cls(conv, core, q_out, q_in, bias, max_ranks=max_ranks, min_rank=min_rank,
                   factored=factored)

    @property
    def ranks(self) -> tuple[int, int]:
        """The current Tucker-2 ranks ``(r_in, r_out)`` (the ``tucker2`` decomposer's order)."""
        return int(self.u_in.shape[1]), int(self.u_out.shape[1])

    def low_rank_weight(self) -> torch.Tensor:
        """The kernel ``C x_0 U_out x_1 U_in`` (without the pending update ``delta``)."""
        return torch.einsum("abkl,ta,sb->tskl", self.core, self.u_out, self.u_in)

    @property
    def geometry(self) -> dict[str, object]:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.factored:
            weight = self.low_rank_weight() + self.delta
            return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)
        if self.training and torch.is_grad_enabled():
            return FactoredTuckerConv.apply(
                x, self.bias, self.core, self.u_out, self.u_in, self.geometry, self._receive,
                torch.zeros((), device=x.device, requires_grad=True),
            )
        return tucker_conv(x, self.core, self.u_out, self.u_in, self.bias, self.geometry)

    def _receive(self, gradients: StepGradients) -> None:
        if self._pending is not None and (
            self._pending.core_grad.shape != gradients.core_grad.shape
        ):
            raise DecompositionError(
                "TDLRT: two backward passes through a factored layer with different augmented "
                "bases before integrate(); call integrate() after each backward"
            )
        if self._pending is not None:  # gradient accumulation: the steps add up
            gradients = StepGradients(
                gradients.aug_out, gradients.aug_in, gradients.core_grad + self._pending.core_grad
            )
        self._pending = gradients

    @torch.no_grad()
    def integrate(self, tau: float, *, carry: bool = False, lr: float | None = None) -> None:
        """One integrator step: K- and L-steps (basis augmentation), S-step, truncation at ``tau``.

        Factored mode: the step ``-lr * G`` from the last backward's gradients (a no-op
        when there was no backward since the last call); ``lr`` is required, ``carry``
        is not available (it needs the dense ``delta``). Kernel mode: the pending update
        ``delta`` (``lr`` unused).

        ``carry=False`` (the paper's integrator) drops what the truncation cuts, and ``delta``
        returns to zero. ``carry=True`` keeps it in ``delta``: the layer then computes
        exactly what it did before the step, and a direction the gradient keeps pushing
        accumulates across steps until its singular value passes the tolerance. Without it
        one step's update must exceed ``tau * ||C||`` by itself for a rank to grow (at
        tau 0.1 a layer that needs rank 16 started at rank 2 stays at 2; with it, it rises
        to 16, the rank tau gives the target).
        """
        core, u_out, u_in = self.core, self.u_out, self.u_in
        before = None
        if self.factored:
            if carry:
                raise ConfigError(
                    "TDLRT: carry=True keeps the truncated remainder in the dense `delta`, which a "
                    "factored layer does not have; build the layer with factored=False to carry"
                )
            if lr is None:
                raise ConfigError("TDLRT: a factored layer's integrate() needs lr (the step size)")
            pending, self._pending = self._pending, None
            if pending is None:
                return
            aug_out, aug_in = pending.aug_out, pending.aug_in
            step = -float(lr) * pending.core_grad
        else:
            before = self.low_rank_weight() + self.delta.detach() if carry else None
            update = self.delta.detach().to(self.core.dtype)
            # K-steps: the update's component along each mode, with the other mode projected
            along_out = torch.einsum("tskl,sb->tbkl", update, u_in).reshape(self.out_channels, -1)
            along_in = torch.einsum("tskl,ta->sakl", update, u_out).reshape(self.in_channels, -1)
            q_out, q_in = core_row_bases(core)  # Mat_i(C)^T = Q_i R_i
            aug_out, aug_in = augment(u_out, along_out @ q_out), augment(u_in, along_in @ q_in)
            step = torch.einsum("tskl,tx,sy->xykl", update, aug_out, aug_in)
        # S-step: the same kernel in the augmented bases, plus the projected update
        core_aug = torch.einsum("abkl,xa,yb->xykl", core, aug_out.T @ u_out, aug_in.T @ u_in)
        core_aug += step
        if not torch.isfinite(core_aug).all():
            raise DecompositionError(
                "TDLRT: the Tucker core became non-finite; lower the learning rate"
            )
        # truncation: truncated HOSVD of the augmented core at relative tolerance tau
        threshold = tau * float(core_aug.norm())
        new_out, rank_out = self._truncate(core_aug, 0, threshold, self.max_rank_out)
        new_in, rank_in = self._truncate(core_aug, 1, threshold, self.max_rank_in)
        self.core = torch.einsum("xykl,xa,yb->abkl", core_aug, new_out, new_in).contiguous()
        self.u_out = (aug_out @ new_out).contiguous()
        self.u_in = (aug_in @ new_in).contiguous()
        if before is not None:
            self.delta.copy_((before - self.low_rank_weight()).to(self.delta.dtype))
        elif self.delta is not None:
            self.delta.zero_()

    def _truncate(
        self, core: torch.Tensor, mode: int, threshold: float, max_rank: int
    ) -> tuple[torch.Tensor, int]:
        unfolding = core.movedim(mode, 0).reshape(core.shape[mode], -1)
        left, singular_values, _ = torch.linalg.svd(unfolding, full_matrices=False)
        rank = truncation_rank(singular_values, threshold)
        rank = min(max(rank, self.min_rank), max_rank, left.shape[1])
        return left[:, :rank], rank

    @torch.no_grad()
    def to_tucker2(self, conv: nn.Conv2d) -> nn.Module:
        """The ``tucker2`` decomposer's module at :attr:`ranks`, holding these factors exactly."""
        from rankopt.contract.manager import get_registry

        dec = get_registry().create("decomposers", "tucker2")
        module = dec.build(conv, self.ranks, initialize=False)
        first, middle, last = tucker2_convs(module)
        r_in, r_out = self.ranks
        values = (
            self.u_in.T.reshape(r_in, self.in_channels, 1, 1),
            self.core,
            self.u_out.reshape(self.out_channels, r_out, 1, 1),
        )
        for target, value in zip((first, middle, last), values):
            if tuple(target.weight.shape) != tuple(value.shape):
                raise DecompositionError(
                    f"the tucker2 module's conv weights have shapes "
                    f"{[tuple(c.weight.shape) for c in (first, middle, last)]}, expected "
                    f"{[tuple(v.shape) for v in values]}; TDLRT cannot map its factors"
                )
            target.weight.copy_(value)
        biased = [c for c in (first, middle, last) if c.bias is not None]
        if self.bias is not None:
            if biased != [last]:
                raise DecompositionError(
                    "expected the tucker2 module to carry the bias on its last 1x1 conv"
                )
            last.bias.copy_(self.bias)  # type: ignore[union-attr]
        return module.to(device=self.core.device, dtype=self.core.dtype)

    @torch.no_grad()
    def to_dense(self, conv: nn.Conv2d) -> nn.Conv2d:
        """A copy of ``conv`` holding the learned kernel (for layers Tucker-2 would not shrink)."""
        import copy

        dense = copy.deepcopy(conv).to(device=self.core.device, dtype=self.core.dtype)
        pending = self.delta if self.delta is not None else 0.0
        dense.weight.copy_(self.low_rank_weight() + pending)
        if self.bias is not None:
            dense.bias.copy_(self.bias)  # type: ignore[union-attr]
        return dense

    def extra_repr(self) -> str:
        r_in, r_out = self.ranks
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"ranks=(r_in={r_in}, r_out={r_out}), factored={self.factored}"
        )
