"""TDLRT's forward and backward through the three factor convolutions, never the full kernel.

The layer's kernel ``W = C x_0 U_out x_1 U_in`` acts as three convolutions: the 1x1
``U_in^T`` (S -> r_in channels), the core ``C`` (kh x kw, r_in -> r_out) and the 1x1
``U_out`` (r_out -> T). The backward of :class:`FactoredTuckerConv` gives the input's
gradient through the same three convolutions and, instead of the kernel's gradient
``G``, exactly the projections of ``G`` that the rank-adaptive integrator uses
(seed 003), each computed at factor size:

* K-step (output mode): ``grad K_out = Mat_0(G x_1 U_in^T) Q_out``, ``Mat_0(C)^T = Q_out R_out``:
  the gradient of ``y = K_out * conv(Ten_0(Q_out^T), U_in^T x)`` with respect to ``K_out``.
* L-step (input mode): ``grad K_in = Mat_1(G x_0 U_out^T) Q_in``: the gradient of
  ``y = U_out * conv(Ten_1(Q_in^T), K_in^T x)`` with respect to ``K_in``.
* S-step: ``G x_0 U~_out^T x_1 U~_in^T`` in the bases augmented with the descent
  directions ``-grad K`` (a weight gradient of the core convolution between the
  projected input ``U~_in^T x`` and the projected output gradient ``U~_out^T dy``).

All three steps start from the same kernel (the paper's K, L and S forwards all
compute ``W``), so one forward and one backward per batch give them; torch's
``conv2d_weight``/``conv2d_input`` do the weight and input gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

__all__ = ["FactoredTuckerConv", "StepGradients", "augment", "tucker_conv"]


@dataclass(frozen=True)
class StepGradients:
    """What one backward leaves for :meth:`TuckerTrainingConv2d.integrate` (factor-sized)."""

    aug_out: torch.Tensor  # T x r~_out: orth([U_out, -grad K_out])
    aug_in: torch.Tensor  # S x r~_in: orth([U_in, -grad K_in])
    core_grad: torch.Tensor  # r~_out x r~_in x kh x kw: G in the augmented bases


def _orth(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(matrix, mode="reduced")[0]


def augment(basis: torch.Tensor, descent: torch.Tensor) -> torch.Tensor:
    """``orth([U, descent])``: QR keeps span(U) first and adds the descent's part outside it."""
    return _orth(torch.cat([basis, descent], dim=1))


def core_row_bases(core: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q_out``, ``Q_in`` of ``Mat_0(C)^T = Q_out R_out`` and ``Mat_1(C)^T = Q_in R_in``."""
    r_out, r_in = core.shape[:2]
    q_out = _orth(core.reshape(r_out, -1).T)
    q_in = _orth(core.transpose(0, 1).reshape(r_in, -1).T)
    return q_out, q_in


def _one_by_one(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.reshape(*matrix.shape, 1, 1)


def tucker_conv(
    x: torch.Tensor, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor,
    bias: torch.Tensor | None, geometry: dict[str, Any],
) -> torch.Tensor:
    """``conv(x, C x_0 U_out x_1 U_in) + bias`` as the three convolutions."""
    a = F.conv2d(x, _one_by_one(u_in.T))
    v = F.conv2d(a, core, None, **geometry)
    return F.conv2d(v, _one_by_one(u_out), bias)


class FactoredTuckerConv(torch.autograd.Function):
    """The training forward; its backward hands the integrator's gradients to ``sink``.

    ``forward(x, bias, core, u_out, u_in, geometry, sink, anchor)``: ``sink(StepGradients)``
    is called once per backward. Gradients flow to ``x`` and ``bias`` only: the factors
    move by the integrator, not by an optimizer. ``anchor``, a scalar that requires grad,
    makes the output require grad (so the backward runs) where neither ``x`` nor ``bias`` do.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, core: torch.Tensor,
        u_out: torch.Tensor, u_in: torch.Tensor, geometry: dict[str, Any], sink: Any,
        anchor: torch.Tensor,
    ) -> torch.Tensor:
        # in the factors' precision: the integrator's QR and SVD need it (no autocast)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(core.dtype)
            a = F.conv2d(x, _one_by_one(u_in.T))
            v = F.conv2d(a, core, None, **geometry)
            y = F.conv2d(v, _one_by_one(u_out), bias)
        # a = U_in^T x is recomputed in backward (a cheap 1x1): the step keeps only x saved,
        # as dense training does
        ctx.save_for_backward(x, core, u_out, u_in)
        ctx.geometry, ctx.sink, ctx.has_bias = geometry, sink, bias is not None
        ctx.anchor = anchor.detach()
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, core, u_out, u_in = ctx.saved_tensors
        geometry = ctx.geometry
        a = F.conv2d(x, _one_by_one(u_in.T))
        dy = dy.to(core.dtype).contiguous()
        dv = F.conv2d(dy, _one_by_one(u_out.T))  # U_out^T dy
        da = conv2d_input(a.shape, core, dv, **geometry)
        dx = F.conv2d(da, _one_by_one(u_in)) if ctx.needs_input_grad[0] else None
        dbias = dy.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[1] else None
        with torch.no_grad():
            q_out, q_in = core_row_bases(core)
            r_out, r_in, kh, kw = core.shape
            q_out_core = q_out.T.reshape(r_out, r_in, kh, kw)  # Ten_0(Q_out^T)
            q_in_core = q_in.T.reshape(r_in, r_out, kh, kw).transpose(0, 1)  # Ten_1(Q_in^T)
            z = F.conv2d(a, q_out_core, None, **geometry)
            grad_k_out = torch.einsum("bthw,brhw->tr", dy, z)
            da_l = conv2d_input(a.shape, q_in_core.contiguous(), dv, **geometry)
            grad_k_in = torch.einsum("bshw,brhw->sr", x, da_l)
            aug_out, aug_in = augment(u_out, -grad_k_out), augment(u_in, -grad_k_in)
            core_grad = conv2d_weight(
                F.conv2d(x, _one_by_one(aug_in.T)), (aug_out.shape[1], aug_in.shape[1], kh, kw),
                F.conv2d(dy, _one_by_one(aug_out.T)), **geometry,
            )
            ctx.sink(StepGradients(aug_out, aug_in, core_grad))
        return dx, dbias, None, None, None, None, None, torch.zeros_like(ctx.anchor)
