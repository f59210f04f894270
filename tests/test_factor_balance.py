"""Data-aware factors on one scale: mapping a whitened decomposition back by ``L^-1``
leaves factors of very unequal norms, and fine-tuning LeNet-5's whitened proposals
diverged (NaN at step 16 of 78) until they were balanced (issue 29)."""

from __future__ import annotations

import torch

import rankopt


def _whitening(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-2, 1.5, n, dtype=torch.float64)  # inputs of very unequal scale
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    cov = q @ torch.diag(scales**2) @ q.T
    lower = torch.linalg.cholesky(cov)
    return lower, torch.linalg.inv(lower)


def test_whitened_svd_factors_have_equal_norms_per_component_and_the_same_product() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(30, 40, generator=g)
    lower, inverse = _whitening(40, 1)
    dec = rankopt.decomposer("svd")
    first, second = dec.factors(weight, (12,), whitening=(lower, inverse))
    assert torch.allclose(first.norm(dim=1), second.norm(dim=0), rtol=1e-4)
    # the product is the whitened truncation mapped back: W L truncated, times L^-1
    u, s, vh = torch.linalg.svd(weight.double() @ lower, full_matrices=False)
    expected = (u[:, :12] * s[:12]) @ vh[:12] @ inverse
    assert torch.allclose((second @ first).double(), expected, atol=1e-4 * expected.abs().max())
    # without whitening the split is the usual sqrt(s) on each side
    plain_first, plain_second = dec.factors(weight, (12,))
    assert torch.allclose(plain_first.norm(dim=1), plain_second.norm(dim=0), rtol=1e-4)


def test_whitened_tucker2_input_factor_has_unit_columns_and_the_same_kernel() -> None:
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(24, 16, 3, 3, generator=g)
    lower, inverse = _whitening(16, 3)
    dec = rankopt.decomposer("tucker2")
    core, u_in, u_out = dec.factors(weight, (16, 24), whitening=(lower, inverse))  # full rank: exact
    assert torch.allclose(u_in.norm(dim=0), torch.ones(u_in.shape[1], dtype=u_in.dtype), atol=1e-5)
    rebuilt = torch.einsum("oiab,to,si->tsab", core.double(), u_out.double(), u_in.double())
    assert torch.allclose(rebuilt, weight.double(), atol=1e-4)
