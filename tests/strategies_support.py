"""Shared pieces of the paper-strategy tests: a trained reference on digits, contexts, plain training.

The reference (small_cnn, width 32, seeded, CPU) is trained once per test process and
shared by every strategy test module; contexts copy it, so nothing mutates it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

import rankopt
from rankopt.contract.dataset import DatasetSplits
from rankopt.training.loop import make_loader, seed_everything, train
from rankopt.training.trial import LocalTrialContext

INPUT_SHAPE = (1, 1, 8, 8)
BATCH_SIZE = 64


@functools.lru_cache(maxsize=None)
def trained_reference() -> tuple[nn.Module, DatasetSplits]:
    """small_cnn trained 6 epochs on digits (about 99% validation accuracy)."""
    splits = rankopt.dataset("digits")
    seed_everything(0)  # the model's initialization too, not only the training
    model = rankopt.model("small_cnn", num_classes=10, in_channels=1)
    loader = make_loader(splits.train, batch_size=BATCH_SIZE, shuffle=True, seed=0)
    train(model, loader, epochs=6, lr=0.05, device="cpu", seed=0)
    model.eval()
    return model, splits


def make_context(**kwargs: Any) -> LocalTrialContext:
    """A CPU trial context over the shared reference (tucker2 + energy p=0.95 unless told)."""
    reference, splits = trained_reference()
    return LocalTrialContext(
        reference, splits, input_shape=INPUT_SHAPE, device="cpu", seed=0, batch_size=BATCH_SIZE,
        **kwargs,
    )


# an aggressive compression: plain training then decomposition at these ranks loses accuracy
AGGRESSIVE = {"selector": "fixed", "selector_params": {"fraction": 0.25}}


@functools.lru_cache(maxsize=None)
def plain_compression_loss(epochs: float, lr: float) -> tuple[float, float]:
    """(accuracy, accuracy after compression at AGGRESSIVE ranks) after plain training."""
    ctx = make_context(**AGGRESSIVE)
    model = ctx.model()
    ctx.train(model, epochs=epochs, lr=lr)
    spec = ctx.select_ranks(model)
    return ctx.evaluate(model), ctx.evaluate(ctx.compress(model, spec))


def unfolding_rank(weight: torch.Tensor, mode: int) -> int:
    """The numerical rank of a float32 kernel's mode unfolding (float32 round-off tolerance)."""
    matrix = weight.detach().movedim(mode, 0).reshape(weight.shape[mode], -1).double()
    return int(torch.linalg.matrix_rank(matrix, rtol=1e-5))


def grow_from_rank_2(
    tau: float, lr: float = 0.25, steps: int = 300, *, carry: bool = False,
    record_at: tuple[int, ...] = (),
) -> tuple[torch.Tensor, tuple[int, int], list[tuple[int, tuple[int, int]]]]:
    """TDLRT's rank growth: a rank-2 Tucker training layer trained by SGD on the squared error
    against the conv of a unit-norm 32-channel 3x3 kernel of Tucker-2 ranks (16, 16), halved
    and summed over channels so that the kernel's gradient is about ``W - target`` (``lr``
    is then the share of the error one step removes), integrated with ``tau`` after every
    step. Factored (the paper's integrator) unless ``carry`` (kernel mode, the remainder
    carried). Returns (target kernel, final ranks, [(0, starting ranks)] and
    ``(step, ranks)`` for each step in ``record_at``)."""
    import torch.nn.functional as F

    from rankopt.plugins.strategies._tdlrt_layers import TuckerTrainingConv2d

    g = torch.Generator().manual_seed(0)
    channels, r = 32, 16
    core = torch.randn(r, r, 3, 3, generator=g)
    u_out = torch.linalg.qr(torch.randn(channels, r, generator=g))[0]
    u_in = torch.linalg.qr(torch.randn(channels, r, generator=g))[0]
    target = torch.einsum("abkl,ta,sb->tskl", core, u_out, u_in)
    target /= target.norm()
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    layer = TuckerTrainingConv2d.from_factors(
        conv, 0.01 * torch.randn(2, 2, 3, 3, generator=g), torch.randn(channels, 2, generator=g),
        torch.randn(channels, 2, generator=g), None, max_ranks=(channels, channels),
        factored=not carry,
    )
    opt = torch.optim.SGD([layer.delta], lr=lr) if carry else None
    history = [(0, layer.ranks)]
    for step in range(1, steps + 1):
        x = torch.randn(16, channels, 8, 8, generator=g)
        loss = F.mse_loss(layer(x), F.conv2d(x, target, padding=1)) * channels / 2
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        layer.integrate(tau, carry=carry, lr=lr)
        if step in record_at:
            history.append((step, layer.ranks))
    return target, layer.ranks, history
