"""Checks of a study's model against its data and reference weights, of the settings only
the built model can refute, and of the backend and device, made before anything is
written: a mismatch found here is one clear line instead of a torch traceback after the
run directory was created (or after a reference was trained)."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rankopt.config.schema import StudyConfig
from rankopt.core.errors import ConfigError
from rankopt.contract.dataset import DatasetSplits
from rankopt.compression.surgery import LayerInfo

__all__ = [
    "check_model_on_data",
    "check_reference_weights",
    "check_against_model",
    "check_backend",
    "resolve_driver_device",
]


def _first_batch(data: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from rankopt.training.trial import loader_for

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


def check_against_model(config: StudyConfig, model: nn.Module, targets: list[LayerInfo]) -> None:
    """Settings that only the built model can refute: explicit ranks above a layer's largest,
    and a params limit below what no decomposition of the targets can remove."""
    import fnmatch

    from rankopt.contract.manager import get_registry

    fixed_ranks = config.selectors.get("fixed", {}).get("ranks")
    if isinstance(fixed_ranks, Mapping):
        decomposers = [get_registry().create("decomposers", n) for n in config.decomposers]
        for pattern, ranks in fixed_ranks.items():
            if not isinstance(ranks, list) or not all(isinstance(r, int) for r in ranks):
                continue  # the selector's own validation names the problem
            for target in targets:
                if not fnmatch.fnmatchcase(target.name, str(pattern)):
                    continue
                module = model.get_submodule(target.name)
                for dec in decomposers:
                    if not dec.supports(module):
                        continue
                    largest = dec.max_ranks(module)
                    if len(largest) == len(ranks) and any(r > m for r, m in zip(ranks, largest)):
                        raise ConfigError(
                            f"selectors.fixed.ranks[{pattern!r}]: {ranks} is above the largest "
                            f"ranks {list(largest)} of layer {target.name!r} for decomposer "
                            f"{dec.name!r}; allowed ranks are 1..largest per entry"
                        )
    limit = config.constraints.max_params
    if limit is not None:
        total = sum(p.numel() for p in model.parameters())
        floor = total - sum(t.cost.params for t in targets)
        if limit < floor:
            raise ConfigError(
                f"constraints.max_params: {limit:g} is below the {floor:,} parameters that "
                "compressing the target layers cannot remove (the other layers, norms and "
                f"biases; the model has {total:,}); no trial could meet it: raise the limit "
                "or widen targets"
            )


def resolve_driver_device(config: StudyConfig) -> None:
    """The study's device exists on this machine (with backend ray, a hint at reference.on)."""
    from rankopt.training.devices import resolve_device

    try:
        resolve_device(config.device)
    except ConfigError as exc:
        if config.backend != "ray":
            raise
        raise ConfigError(
            f"{exc}; with backend ray, reference: {{on: cluster}} trains the reference on a "
            "worker, so this machine needs no GPU"
        ) from None


def check_backend(config: StudyConfig) -> None:
    """Ray installed when asked for; GPUs per trial that this machine has (a Ray cluster
    named by an address is checked once connected, see ``ray_backend.connect``)."""
    address = config.address or os.environ.get("RAY_ADDRESS")
    if config.backend == "ray":
        try:
            importlib.import_module("ray.tune.search.optuna")  # raises unless ray[tune] is installed
        except ImportError as exc:
            raise ConfigError(
                f"backend: 'ray' needs ray[tune] installed ({exc}); pip install 'ray[tune]'"
            ) from None
    if config.backend == "ray" and config.trial_timeout is not None:
        # the watchdog forks the trial's process; forking inside a Ray worker is not done here
        raise ConfigError(
            f"trial_timeout: {config.trial_timeout:g} s is supported on the local backend only; "
            "drop it for backend: ray (each Ray trial already runs in its own worker process), "
            "or run with --backend local"
        )
    gpus = config.resources.gpus
    remote = config.backend == "ray" and bool(address)
    if gpus > 0 and not remote and torch.cuda.device_count() < math.ceil(gpus):
        raise ConfigError(
            f"resources.gpus: {gpus:g} GPU(s) per trial requested, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); set resources.gpus: 0, or run on a "
            "GPU machine" + (" or Ray cluster (--address)" if config.backend == "ray" else "")
        )
