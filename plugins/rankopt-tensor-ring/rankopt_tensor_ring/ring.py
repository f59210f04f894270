"""Tensor Ring algebra: the ring layout of a conv kernel, TR-SVD, reconstruction, largest ranks.

A kernel ``W`` of shape ``(T, S, kh, kw)``, with the input channels factorized as
``S = I_1 ... I_din`` and the output channels as ``T = O_1 ... O_dout``, is viewed as
a tensor with the modes ``[I_1, ..., I_din, kh*kw, O_1, ..., O_dout]`` (the ring's
cores in order). A ring of ``d`` cores has ``d`` bonds: bond ``k`` is the left bond
of core ``k``, so core ``k`` has the shape ``(r_k, n_k, r_{k+1})`` with
``r_d = r_0`` (bond 0 closes the ring between the last output core and the first
input core).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorly as tl
import torch
from tensorly.decomposition import tensor_train

__all__ = [
    "balanced_factors",
    "kernel_to_ring",
    "ring_to_kernel",
    "start_core",
    "ring_max_ranks",
    "tr_svd",
    "ring_reconstruct",
]


def balanced_factors(n: int, parts: int = 2) -> list[int]:
    """``n`` as a product of at most ``parts`` factors, as equal as possible, descending.

    ``balanced_factors(64) == [8, 8]``, ``balanced_factors(12) == [4, 3]``,
    ``balanced_factors(64, 3) == [4, 4, 4]``; a prime stays whole: ``[7]``.
    """
    if parts <= 1 or n < 4:
        return [n]
    target = n ** (1.0 / parts)
    best = min(
        (f for f in range(2, int(math.isqrt(n)) + 1) if n % f == 0),
        key=lambda f: (abs(math.log(f) - math.log(target)), -f),
        default=None,
    )
    if best is None:
        return [n]
    return sorted([best, *balanced_factors(n // best, parts - 1)], reverse=True)


def kernel_to_ring(weight: torch.Tensor, in_factors: Sequence[int], out_factors: Sequence[int]) -> torch.Tensor:
    """The ``(T, S, kh, kw)`` kernel as the ring tensor ``[I_1..I_din, kh*kw, O_1..O_dout]``."""
    t, s, kh, kw = weight.shape
    d_in, d_out = len(in_factors), len(out_factors)
    w = weight.reshape(*out_factors, *in_factors, kh * kw)
    order = [*range(d_out, d_out + d_in), d_out + d_in, *range(d_out)]
    return w.permute(order)


def ring_to_kernel(
    tensor: torch.Tensor, in_factors: Sequence[int], out_factors: Sequence[int], kernel_size: Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`kernel_to_ring`."""
    d_in, d_out = len(in_factors), len(out_factors)
    order = [*range(d_in + 1, d_in + 1 + d_out), *range(d_in), d_in]
    w = tensor.permute(order)
    return w.reshape(math.prod(out_factors), math.prod(in_factors), *kernel_size)


def start_core(modes: Sequence[int]) -> int:
    """The core TR-SVD starts from: the largest mode (the first one on ties).

    TR-SVD splits the first unfolding's rank into ``r_s * r_{s+1}``, so the two bonds
    next to the start core are bounded by its mode size; the largest mode bounds
    them least.
    """
    return max(range(len(modes)), key=lambda k: (modes[k], -k))


def ring_max_ranks(modes: Sequence[int]) -> tuple[int, ...]:
    """The bond ranks at which TR-SVD from :func:`start_core` represents any tensor exactly.

    With ``s`` the start core and the ring rotated to start there (primes): the first
    unfolding has rank ``m = min(n'_0, prod(other modes))``, split as ``r'_0 * r'_1 = m``
    with ``r'_0`` the largest divisor of ``m`` not above ``sqrt(m)``; then, as in
    TT-SVD, ``r'_{j+1} = min(r'_j * n'_j, r'_0 * prod(n'_i, i > j))``. Larger ranks
    add nothing; any ranks within these bounds are feasible.
    """
    d = len(modes)
    s = start_core(modes)
    n = [modes[(s + j) % d] for j in range(d)]
    if d == 1:
        return (1,)
    m = min(n[0], math.prod(n[1:]))
    r0 = max(f for f in range(1, math.isqrt(m) + 1) if m % f == 0)
    rot = [r0, m // r0]
    for j in range(1, d - 1):
        rot.append(min(rot[j] * n[j], r0 * math.prod(n[j + 1 :])))
    return tuple(rot[(k - s) % d] for k in range(d))


def _canonical_basis(u: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of ``span(u)`` that depends on the subspace only.

    TR-SVD (Zhao et al., 2016, Alg. 1) reshapes the first factor's ``r_0 * r_1``
    singular vectors into two bonds; any rotation of them is an equally good first
    factor but changes how the later truncations see the bonds, so plain TR-SVD is
    not idempotent. The polar factor of ``P E`` (``P`` the projector onto the span,
    ``E`` a fixed matrix) is the same for every basis of the span, which makes the
    projection reproduce any tensor it returned.
    """
    n, k = u.shape
    fixed = torch.randn(n, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    left, _, right = torch.linalg.svd(u.T @ fixed.to(u.device), full_matrices=False)
    return u @ (left @ right)


def tr_svd(tensor: torch.Tensor, ranks: Sequence[int]) -> list[torch.Tensor]:
    """Tensor Ring cores of ``tensor`` at bond ``ranks`` (each within :func:`ring_max_ranks`).

    TR-SVD from the :func:`start_core`: the first unfolding's SVD gives the start
    core in a canonical basis (:func:`_canonical_basis`), and TensorLy's TT-SVD
    (``tensor_train``) factorizes the rest as a chain from bond ``r_{s+1}`` round
    to bond ``r_s``. Cores come back in ring order, zero-padded to exactly
    ``(r_k, n_k, r_{k+1})`` where an SVD found a smaller rank (the padding changes
    nothing). Computed in float64; the cores have ``tensor``'s dtype.
    """
    modes = list(tensor.shape)
    d = len(modes)
    s = start_core(modes)
    x = tensor.detach().to(torch.float64)
    rot = [(s + j) % d for j in range(d)]
    n = [modes[k] for k in rot]
    r = [int(ranks[k]) for k in rot]
    if d == 1:
        cores = [x.reshape(1, n[0], 1)]
    else:
        matrix = x.permute(rot).reshape(n[0], -1)
        k = r[0] * r[1]
        u = torch.linalg.svd(matrix, full_matrices=False)[0][:, :k]
        basis = _canonical_basis(u)
        first = basis.reshape(n[0], r[0], r[1]).permute(1, 0, 2)  # (r0, n0, r1)
        rest = (basis.T @ matrix).reshape(r[0], r[1], *n[1:])
        rest = rest.permute(1, *range(2, d + 1), 0)  # (r1, n1, ..., n_{d-1}, r0)
        prev = tl.get_backend()
        tl.set_backend("pytorch")
        try:
            chain = [f for f in tensor_train(rest, rank=[1, *r[1:], r[0], 1])]
        finally:
            tl.set_backend(prev)
        # the chain's end cores map bonds r1 and r0 onto the TT's own (possibly smaller) bonds
        head, tail = chain[0][0], chain[-1][:, :, 0]  # (r1, a1), (a_d, r0)
        first = torch.einsum("ca,anb,bd->cnd", tail, first, head)
        cores = [first, *chain[1:-1]]
    padded = []
    for j, core in enumerate(cores):
        full = torch.zeros(r[j], n[j], r[(j + 1) % d], dtype=torch.float64, device=core.device)
        full[: core.shape[0], :, : core.shape[2]] = core
        padded.append(full)
    out = [padded[(k - s) % d] for k in range(d)]
    return [c.to(tensor.dtype) for c in out]


def ring_reconstruct(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor of a ring: ``T[i_0..i_{d-1}] = trace(G_0[:, i_0, :] ... G_{d-1}[:, i_{d-1}, :])``."""
    chain = cores[0]
    for core in cores[1:]:
        r0, p, r = chain.shape
        chain = (chain.reshape(r0 * p, r) @ core.reshape(r, -1)).reshape(r0, -1, core.shape[-1])
    full = torch.diagonal(chain, dim1=0, dim2=2).sum(-1)
    return full.reshape(*(c.shape[1] for c in cores))
