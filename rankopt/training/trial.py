"""The concrete :class:`~rankopt.TrialContext` that studies hand to strategies.

A :class:`LocalTrialContext` holds the trained reference model, the data splits and
the trial's choices (decomposer per layer, rank selector and its parameters), and
offers a strategy the operations it composes a trial from: ``model``, ``train``,
``evaluate``, ``select_ranks``, ``compress`` and ``report``. Strategy authors can
build one directly to test a strategy on a tiny model::

    ctx = LocalTrialContext(net, splits, input_shape=(1, 1, 8, 8), device="cpu")
    outcome = rankopt.strategy("finetune").run(ctx, {"epochs": 1, "lr": 0.01})
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from rankopt.core.errors import ConfigError
from rankopt.contract.dataset import DatasetSplits
from rankopt.contract.selector import LayerChoice
from rankopt.compression.spectral import SpectralCache
from rankopt.compression.surgery import LayerInfo, Spec, find_layers
from rankopt.compression.surgery import compress as compress_model

if TYPE_CHECKING:  # pragma: no cover
    from rankopt.training.loop import TrainResult

__all__ = ["LocalTrialContext", "resolve_layer_decomposers", "loader_for"]


def loader_for(
    data: Any, *, batch_size: int, shuffle: bool = False, seed: int | None = None
) -> DataLoader:
    """A loader over a split: a ready ``DataLoader`` (a user's own pipeline) is used as is."""
    from rankopt.training.loop import make_loader

    if isinstance(data, DataLoader):
        return data
    return make_loader(data, batch_size=batch_size, shuffle=shuffle, seed=seed)


def resolve_layer_decomposers(
    reference: nn.Module,
    targets: Sequence[LayerInfo],
    decomposers: str | Mapping[str, str],
) -> dict[str, str]:
    """``{layer name: decomposer name}`` for the target layers a decomposer will handle.

    One name applies to every target it supports (the others stay full); a mapping
    names a decomposer per layer and every named layer must be a target the named
    decomposer supports.
    """
    from rankopt.contract.manager import get_registry

    registry = get_registry()
    target_names = [t.name for t in targets]
    if isinstance(decomposers, str):
        dec = registry.create("decomposers", decomposers)
        return {
            name: decomposers for name in target_names if dec.supports(reference.get_submodule(name))
        }
    if not isinstance(decomposers, Mapping):
        raise ConfigError(
            "decomposers must be one decomposer name or a mapping {layer name: decomposer name}, "
            f"got {type(decomposers).__name__}"
        )
    out: dict[str, str] = {}
    for name, dec_name in decomposers.items():
        if name not in target_names:
            raise ConfigError(
                f"decomposers[{name!r}]: {name!r} is not a target layer; target layers are "
                f"{target_names}"
            )
        dec = registry.create("decomposers", dec_name)
        dec.check_module(reference.get_submodule(name), name=name)
        out[name] = dec_name
    return out


class LocalTrialContext:
    """A trial's context in this process (implements :class:`rankopt.TrialContext`).

    Args:
        reference: the trained uncompressed model; never modified.
        splits: the data; ``train`` for :meth:`train`, ``val`` for :meth:`evaluate`.
        input_shape: batch-1 input shape, e.g. ``(1, 1, 8, 8)``, for layer discovery.
        targets: the compressible layers (default: every Conv2d/Linear the forward reaches).
        decomposers: one decomposer name for every target it supports, or ``{layer: name}``.
        selector, selector_params: the rank selector and its parameters (checked here).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a :class:`torch.device`.
        seed: seeds data order and initialization of every :meth:`train` call.
        batch_size: batch size of the train and validation loaders.
        train_options: defaults for :meth:`train` (``optimizer``, ``schedule``, ``amp``, ...),
            overridden by the options of each call.
        cache: the spectral cache the selector reads (default: the process-wide one).
        progress: passed to :func:`rankopt.training.loop.train` (None: quiet).
        keep_faster: measure each selected layer's factorized form against the original
            on ``device`` and keep the original where it is faster
            (:func:`rankopt.compression.latency.keep_faster_layers`); dropped layers are reported
            under ``kept_full_for_speed``.
        rank_multiple, min_in_channels, min_saving: see :func:`rankopt.compression.selection.select_spec`.
        latency: where ``keep_faster`` measures: ``runtime``, ``batch``, ``threads``,
            ``rounds`` (see :class:`rankopt.config.schema.LatencyConfig`; default eager, 1, 1, 15).
        latency_cache: a directory caching the per-layer measurements across trials.
    """

    def __init__(
        self,
        reference: nn.Module,
        splits: DatasetSplits,
        *,
        input_shape: tuple[int, ...],
        targets: Sequence[LayerInfo] | None = None,
        decomposers: str | Mapping[str, str] = "tucker2",
        selector: str = "energy",
        selector_params: Mapping[str, Any] | None = None,
        device: str | torch.device = "auto",
        seed: int = 0,
        batch_size: int = 128,
        train_options: Mapping[str, Any] | None = None,
        cache: SpectralCache | None = None,
        progress: Any = None,
        keep_faster: bool = False,
        rank_multiple: int = 1,
        min_in_channels: int = 1,
        min_saving: float = 0.0,
        latency: Mapping[str, Any] | None = None,
        latency_cache: str | os.PathLike[str] | None = None,
    ) -> None:
        from rankopt.training.devices import resolve_device
        from rankopt.contract.manager import get_registry

        if not isinstance(reference, nn.Module):
            raise ConfigError(f"reference must be an nn.Module, got {type(reference).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device: torch.device = resolve_device(device)
        self.seed: int = int(seed)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.splits = splits
        self.batch_size = batch_size
        self.train_options: dict[str, Any] = dict(train_options or {})
        self.progress = progress
        self.cache = cache
        self.keep_faster = bool(keep_faster)
        self.rank_multiple = rank_multiple
        self.min_in_channels = min_in_channels
        self.min_saving = min_saving
        self.latency: dict[str, Any] = dict(latency or {})
        self.latency_cache = latency_cache
        self._reference = reference
        self.targets: list[LayerInfo] = (
            list(targets) if targets is not None else find_layers(reference, self.input_shape)
        )
        self.layer_decomposers = resolve_layer_decomposers(reference, self.targets, decomposers)
        self.selector = selector
        sel = get_registry().create("rank_selectors", selector)
        self.selector_params: dict[str, Any] = sel.validate_params(dict(selector_params or {}))
        self.reported: dict[str, Any] = {}
        self.choices: list[LayerChoice] = []
        self.train_results: list[TrainResult] = []
        self.train_seconds = 0.0  # wall time inside train() and evaluate(), for overhead figures
        self.eval_seconds = 0.0
        self.compressed_layers: list[str] = []
        self._teacher: nn.Module | None = None
        self._train_loader: Any = None
        self._val_loader: Any = None

    # -- models ----------------------------------------------------------------------
    def model(self) -> nn.Module:
        """A fresh deep copy of the reference model on :attr:`device`, in train mode."""
        net = copy.deepcopy(self._reference).to(self.device)
        net.train()
        return net

    # -- data --------------------------------------------------------------------------
    def _loaders(self) -> tuple[Any, Any]:
        if self._train_loader is None:
            self._train_loader = loader_for(
                self.splits.train, batch_size=self.batch_size, shuffle=True, seed=self.seed
            )
            self._val_loader = loader_for(self.splits.val, batch_size=self.batch_size)
        return self._train_loader, self._val_loader

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (batches) in one epoch of :meth:`train`."""
        return len(self._loaders()[0])

    # -- the operations ------------------------------------------------------------------
    def train(
        self,
        model: nn.Module,
        *,
        epochs: float,
        lr: float,
        extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
        step_callback: Callable[[nn.Module, int], None] | None = None,
        **options: Any,
    ) -> TrainResult:
        """Train ``model`` in place on the training split (see :func:`rankopt.training.loop.train`).

        ``distill_weight``, ``distill_temperature``, ``distill_features`` (the fine-tuning
        strategies' hyperparameters, :data:`rankopt.training.distill.DISTILL_DEFAULTS`) distill the
        reference into ``model`` (:class:`rankopt.training.distill.Distillation`); features match
        the outputs of the layers the last :meth:`compress` replaced. A call that names
        none of them trains without distillation (the strategies pass theirs, on by default).
        """
        from rankopt.training.loop import train

        start = time.perf_counter()
        loader, _ = self._loaders()
        distill = self._distillation(options)
        merged = {**self.train_options, **options}
        merged.setdefault("seed", self.seed)
        merged.setdefault("progress", self.progress)
        result = train(
            model,
            loader,
            epochs=epochs,
            lr=lr,
            device=self.device,
            extra_loss=extra_loss,
            step_callback=step_callback,
            distill=distill,
            **merged,
        )
        self.train_results.append(result)
        self.train_seconds += time.perf_counter() - start
        return result

    def _distillation(self, options: dict[str, Any]) -> Any:
        """Pop the ``distill_*`` options; a Distillation from the reference when they ask
        for one (weight or features > 0), matching the layers :meth:`compress` replaced."""
        from rankopt.training.distill import DISTILL_OFF, Distillation, check_distill_params

        params = {k: options.pop(k) for k in list(options) if k in DISTILL_OFF}
        params = {**DISTILL_OFF, **params}
        check_distill_params("train", params)
        if params["distill_weight"] == 0 and params["distill_features"] == 0:
            return None
        if self._teacher is None:  # one eval-mode copy of the reference per trial
            self._teacher = copy.deepcopy(self._reference).to(self.device).eval()
            for p in self._teacher.parameters():
                p.requires_grad_(False)
        return Distillation(
            self._teacher,
            weight=float(params["distill_weight"]),
            temperature=float(params["distill_temperature"]),
            features=float(params["distill_features"]),
            layers=tuple(self.compressed_layers),
        )

    def evaluate(self, model: nn.Module) -> float:
        """Top-1 accuracy on the validation split, in [0, 1]."""
        from rankopt.training.loop import evaluate

        start = time.perf_counter()
        _, loader = self._loaders()
        accuracy = float(evaluate(model, loader, device=self.device))
        self.eval_seconds += time.perf_counter() - start
        return accuracy

    def select_ranks(self, model: nn.Module) -> Spec:
        """A spec for ``model``'s target layers from the selector, on its current weights.

        The per-layer decisions (ranks, or why a layer stays full) are kept in
        :attr:`choices`.
        """
        from rankopt.compression.selection import select_spec

        spec, choices = select_spec(
            model,
            self.targets,
            self.layer_decomposers,
            self.selector,
            self.selector_params,
            cache=self.cache,
            input_shape=self.input_shape,
            rank_multiple=self.rank_multiple,
            min_in_channels=self.min_in_channels,
            min_saving=self.min_saving,
        )
        self.choices = list(choices)
        if self.keep_faster and spec:
            from rankopt.compression.latency import keep_faster_layers

            lat = self.latency
            spec, dropped = keep_faster_layers(
                model, spec, self.targets, runtime=lat.get("runtime", "eager"), batch=lat.get("batch", 1),
                threads=lat.get("threads", 1), repeats=lat.get("rounds", 15), cache_dir=self.latency_cache,
            )
            if dropped:
                self.reported.setdefault("kept_full_for_speed", {}).update(dropped)
        return spec

    def compress(self, model: nn.Module, spec: Mapping[str, Mapping[str, Any]]) -> nn.Module:
        """A compressed copy of ``model`` on :attr:`device` (``model`` is left untouched)."""
        self.compressed_layers = list(spec)  # the layers distillation's features match
        return compress_model(model, spec, input_shape=self.input_shape).to(self.device)

    def report(self, **metrics: Any) -> None:
        """Record extra metrics of the trial; they end up in the trial's ``metrics.json``."""
        self.reported.update(metrics)

    def __repr__(self) -> str:
        return (
            f"LocalTrialContext(targets={len(self.targets)}, selector={self.selector!r}, "
            f"device={str(self.device)!r}, seed={self.seed})"
        )
