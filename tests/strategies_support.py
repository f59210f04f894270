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
