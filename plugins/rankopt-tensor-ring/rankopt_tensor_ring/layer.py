"""The Tensor Ring convolution layer (Wang et al., CVPR 2018, Sec. 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankopt_tensor_ring.ring import ring_reconstruct, ring_to_kernel

__all__ = ["TensorRingConv2d", "merge_chain"]

Padding = tuple[int, int] | str


def merge_chain(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract a chain of cores ``(r_a, n_i, r_b)`` into one ``(r_first, prod n_i, r_last)``.

    Each step is one matrix product (``2 * r_first * P * r * n * r'`` FLOPs), which is
    what :meth:`TensorRingDecomposer.cost` counts.
    """
    merged = cores[0]
    for core in cores[1:]:
        r0, p, r = merged.shape
        merged = (merged.reshape(r0 * p, r) @ core.reshape(r, -1)).reshape(r0, -1, core.shape[-1])
    return merged


class TensorRingConv2d(nn.Module):
    """A Conv2d whose kernel is a tensor ring of input cores, a conv core and output cores.

    The forward pass follows the paper's three steps, with the ring's closing bond
    ``r_0`` carried through them:

    1. contract-in: the input cores are merged into ``(r_0, S, r_din)`` and applied
       to the input as one 1x1 convolution ``S -> r_0 * r_din``;
    2. the conv core ``(r_{din+1}, r_din, kh, kw)`` runs with the original stride,
       padding and dilation on each of the ``r_0`` slices (folded into the batch);
    3. contract-out: the output cores are merged into ``(r_{din+1}, T, r_0)`` and
       applied as a 1x1 convolution ``r_0 * r_{din+1} -> T`` that sums over both
       bonds, closing the ring; the original bias is added here.

    Parameters are the cores themselves (``in_cores.i``, ``kernel_core``,
    ``out_cores.j``) and ``bias``; the merged matrices are recomputed every pass.
    """

    def __init__(
        self,
        in_factors: Sequence[int],
        out_factors: Sequence[int],
        ranks: Sequence[int],
        kernel_size: tuple[int, int],
        *,
        stride: tuple[int, int] = (1, 1),
        padding: Padding = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_factors = tuple(int(f) for f in in_factors)
        self.out_factors = tuple(int(f) for f in out_factors)
        self.ranks = tuple(int(r) for r in ranks)
        d_in, d_out = len(self.in_factors), len(self.out_factors)
        d = d_in + 1 + d_out
        if len(self.ranks) != d:
            raise ValueError(f"a ring of {d} cores needs {d} ranks, got {list(self.ranks)}")
        self.kernel_size = tuple(kernel_size)
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        self.in_channels, self.out_channels = math.prod(self.in_factors), math.prod(self.out_factors)
        r = self.ranks

        def bond(k: int) -> int:
            return r[k % d]

        self.in_cores = nn.ParameterList(
            nn.Parameter(torch.empty(bond(i), f, bond(i + 1))) for i, f in enumerate(self.in_factors)
        )
        self.kernel_core = nn.Parameter(torch.empty(bond(d_in + 1), bond(d_in), *self.kernel_size))
        self.out_cores = nn.ParameterList(
            nn.Parameter(torch.empty(bond(d_in + 1 + j), f, bond(d_in + 2 + j)))
            for j, f in enumerate(self.out_factors)
        )
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random cores scaled so the full kernel has about Kaiming-uniform variance."""
        fan_in = self.in_channels * math.prod(self.kernel_size)
        cores = [*self.in_cores, self.kernel_core, *self.out_cores]
        # the kernel is a sum of prod(bonds) products of len(cores) entries
        target = 1.0 / fan_in
        per_core = (target / math.prod(self.ranks)) ** (1.0 / len(cores))
        with torch.no_grad():
            for core in cores:
                core.normal_(0.0, math.sqrt(per_core))
            if self.bias is not None:
                self.bias.zero_()

    def ring_cores(self) -> list[torch.Tensor]:
        """The cores in ring order, each ``(r_k, n_k, r_{k+1})`` (the kernel core as ``(r, kh*kw, r')``)."""
        kc = self.kernel_core
        kernel = kc.reshape(kc.shape[0], kc.shape[1], -1).permute(1, 2, 0)
        return [*self.in_cores, kernel, *self.out_cores]

    def reconstruct_weight(self) -> torch.Tensor:
        """The full ``(T, S, kh, kw)`` kernel this layer computes."""
        full = ring_reconstruct(self.ring_cores())
        return ring_to_kernel(full, self.in_factors, self.out_factors, self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r0 = self.ranks[0]
        into = merge_chain(list(self.in_cores))  # (r0, S, r_din)
        r_din = into.shape[2]
        w_in = into.permute(0, 2, 1).reshape(r0 * r_din, self.in_channels, 1, 1)
        y = F.conv2d(x, w_in)  # (n, r0 * r_din, h, w), r0-major
        # the kernel core applied to each of the r0 ring slices: a grouped conv with the
        # core repeated per group (the same multiply-adds as folding r0 into the batch,
        # and no activation reshapes, so exporters see static shapes: ONNX needs them)
        r_mid = self.kernel_core.shape[0]
        kernel = self.kernel_core.repeat(r0, 1, 1, 1) if r0 > 1 else self.kernel_core
        z = F.conv2d(y, kernel, None, self.stride, self.padding, self.dilation, groups=r0)
        out = merge_chain(list(self.out_cores))  # (r_mid, T, r0)
        w_out = out.permute(1, 2, 0).reshape(self.out_channels, r0 * r_mid, 1, 1)
        return F.conv2d(z, w_out, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_factors={list(self.in_factors)}, out_factors={list(self.out_factors)}, "
            f"ranks={list(self.ranks)}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
        )
