"""Checks of a study's model against its data and reference weights, made before anything
is written: a mismatch found here is one clear line instead of a torch traceback after
the run directory was created (or after a reference was trained)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rankopt.config import StudyConfig
from rankopt.errors import ConfigError
from rankopt.plugins.datasets.base import DatasetSplits

__all__ = ["check_model_on_data", "check_reference_weights"]


def _first_batch(data: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from rankopt.trial import loader_for

    # iterating a DataLoader draws from torch's RNG: keep the study's seeded stream intact
    with torch.random.fork_rng(devices=[]):
        batch = next(iter(loader_for(data, batch_size=batch_size)))
    return batch[0], batch[1]


def check_model_on_data(model: nn.Module, splits: DatasetSplits, batch_size: int, *, given: str) -> None:
    """One forward pass of ``model`` on one training batch: the data's sample shape must be
    ``splits.input_shape``, the model must accept it and give ``num_classes`` logits, and
    every label must be a class index."""
    try:
        inputs, labels = _first_batch(splits.train, min(batch_size, 16))
    except StopIteration:
        raise ConfigError("data: the training split is empty; give a dataset with samples") from None
    shape = tuple(int(d) for d in splits.input_shape)
    if tuple(inputs.shape[1:]) != shape:
        raise ConfigError(
            f"data: input_shape {list(shape)} does not match the data's samples, which have "
            f"shape {list(inputs.shape[1:])}; give DatasetSplits(input_shape=...) as (C, H, W) "
            "of one sample"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            logits = model(inputs.float() if not inputs.is_floating_point() else inputs)
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{given}: the model fails on a batch of the data (samples of shape {list(shape)}, "
            f"{splits.num_classes} classes): {detail}; check in_channels and the input size "
            "the model expects"
        ) from None
    finally:
        model.train(was_training)
    classes = int(splits.num_classes)
    if logits.ndim != 2 or logits.shape[1] != classes:
        raise ConfigError(
            f"{given}: the model gives outputs of shape {list(logits.shape)} on a batch, but the "
            f"data has {classes} classes; set num_classes: {classes} in model.kwargs (or "
            "build the model for it)"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ConfigError(
            f"data: labels run from {int(labels.min())} to {int(labels.max())}, outside the "
            f"{classes} classes (0..{classes - 1}) the data declares; fix num_classes"
        )


def check_reference_weights(config: StudyConfig, model: nn.Module) -> None:
    """``reference.weights`` must be a state_dict (tensors only, loadable with
    ``weights_only=True``) with exactly the model's keys and shapes."""
    path = config.reference.weights
    if not path:
        return
    where = f"reference.weights: {path!r}"
    if not Path(path).is_file():
        raise ConfigError(f"{where} does not exist; give a state_dict saved with "
                          "torch.save(model.state_dict(), path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"{where} is not a state_dict file loadable with weights_only=True "
            f"({type(exc).__name__}: {first[:200]}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"{where} holds a {type(state).__name__}, not a state_dict of tensors; save it "
            "with torch.save(model.state_dict(), path)"
        )
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(set(expected) | set(state)):
        got = tuple(state[key].shape) if key in state else None
        if got != expected.get(key):
            what = ("is missing" if got is None else "is not in the model" if key not in expected
                    else f"has shape {list(got)}, the model's is {list(expected[key])}")
            raise ConfigError(
                f"{where} does not fit the model: {key!r} {what}; give the weights of this "
                "architecture (same model.kwargs)"
            )
