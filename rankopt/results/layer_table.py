"""The per-layer rank table of a model (the NRMF layer table): :func:`inspect_layers`,
which ``rankopt inspect`` prints.

For every Conv2d/Linear layer: S, T, kernel, parameters, and for EVBMF and the energy
threshold at p = 0.92, 0.95, 0.98 the selected ranks, the decomposer's exact parameter
count at those ranks and the compression ratio. A layer whose factorized form would
not be smaller is marked as kept full (that is what a study would do with it).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from rankopt.core.errors import ConfigError
from rankopt.core.limits import check_size_on_meta

__all__ = ["LayerTable", "inspect_layers", "inspect_rows", "load_model", "load_run_reference"]

STUDY_SUFFIXES = (".yaml", ".yml")
DEFAULT_SAMPLE_SHAPE = (3, 32, 32)


def _accepts(factory: Any, key: str) -> bool:
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD for p in params) or key in {p.name for p in params}


def load_model(
    source: str,
    *,
    weights: Path | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[Any, tuple[int, ...], str]:
    """(model, input shape with batch, label) for a registered name, a
    ``package.module:callable`` or a study file.

    The model is built with torch's RNG seeded by ``seed`` (the caller's RNG state is
    restored), so a randomly initialized model is the same on every call and its
    spectra are found in a disk cache.
    """
    import torch

    from rankopt.contract.manager import get_registry

    kwargs: dict[str, Any] = {}
    sample_shape: tuple[int, ...] | None = None
    label = source
    data_shape = None
    folders: list[str | None] = [os.getcwd()]  # `rankopt inspect mynet:factory` beside mynet.py
    if source.endswith(STUDY_SUFFIXES):
        from rankopt.config.schema import load_config

        config = load_config(source, check_paths=False)
        if config.model is None:
            raise ConfigError(
                f"study file {source!r} names no model (model.name); `rankopt inspect` needs one"
            )
        name, kwargs = config.model.name, dict(config.model.kwargs)
        folders = [config.model.path]
        data_shape = _study_data_shape(config)  # the study's own images, not 3x32x32
        if weights is None and config.reference.weights:
            weights = Path(config.reference.weights)
        label = f"{name} (from {source})"
    else:
        name = source
    if ":" in name:
        from rankopt.config.schema import import_model_factory

        factory = import_model_factory(name, "MODEL_OR_STUDY", folders)
    else:
        record = get_registry().record("models", name)
        factory = record.factory
        sample_shape = getattr(record, "input_shape", None)
        kwargs = {**dict(getattr(record, "defaults", {}) or {}), **kwargs}
    if data_shape is not None:
        sample_shape, classes = data_shape
        for key, value in (("num_classes", classes), ("in_channels", sample_shape[0])):
            if key not in kwargs and _accepts(factory, key):
                kwargs[key] = value
    if num_classes is not None:
        if not _accepts(factory, "num_classes"):
            raise ConfigError(f"--num-classes: model {name!r} takes no num_classes argument")
        kwargs["num_classes"] = num_classes
    check_size_on_meta(factory, kwargs, "model kwargs")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{name!r} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        if not Path(weights).is_file():
            raise ConfigError(f"--weights: file {str(weights)!r} does not exist")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(
                f"--weights: {str(weights)!r} is not a state_dict file loadable with "
                f"weights_only=True ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(state, Mapping):
            raise ConfigError(f"--weights: {str(weights)!r} holds a {type(state).__name__}, not a state_dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"--weights: {str(weights)!r} does not fit model {name!r}: {exc}") from None
    if input_shape is None:
        input_shape = (1, *(sample_shape or DEFAULT_SAMPLE_SHAPE))
    return model.eval(), tuple(input_shape), label


def _study_data_shape(config: Any) -> tuple[tuple[int, ...], int] | None:
    """(one input's shape, number of classes) of a study's dataset, or None when it cannot
    be loaded here (then the usual default shape applies)."""
    from rankopt.contract.manager import get_registry

    if config.data.name is None:
        return None
    try:
        splits = get_registry().create("datasets", config.data.name, **config.data.kwargs)
    except Exception:  # missing files, no network: inspect still runs on the default shape
        return None
    return tuple(int(d) for d in splits.input_shape), int(splits.num_classes)


def inspect_rows(
    model: Any,
    input_shape: Sequence[int],
    *,
    decomposer: str = "tucker2",
    thresholds: Sequence[float] = (0.92, 0.95, 0.98),
    cache: Any = None,
    min_in_channels: int = 4,
    min_saving: float = 0.1,
) -> tuple[list[str], list[dict[str, Any]]]:
    """(method names, one row per compressible layer) of the inspect table.

    A layer with fewer than ``min_in_channels`` input channels (a study's default 4)
    gets ``dense: true`` and a note saying why a study leaves it full; its ranks are
    still shown, and the model totals leave it uncompressed. A method's ranks that save
    less than ``min_saving`` (a study's ``targets.min_saving``, default 0.1) are
    ``compressed: false`` with the ``reason``.
    """
    from rankopt.compression.selection import cost_increase_reason, layer_costs
    from rankopt.compression.surgery import find_layers
    from rankopt.contract.manager import get_registry

    registry = get_registry()
    dec = registry.create("decomposers", decomposer)
    methods: list[tuple[str, Any, dict[str, Any]]] = [("vbmf", registry.create("rank_selectors", "vbmf"), {})]
    energy = registry.create("rank_selectors", "energy")
    methods += [(f"energy@{p:g}", energy, {"p": p}) for p in thresholds]
    from rankopt.compression.surgery import get_submodule

    rows = []
    for layer in find_layers(model, tuple(input_shape)):
        module = get_submodule(model, layer.name)
        row: dict[str, Any] = {
            "layer": layer.name,
            "kind": layer.kind,
            "S": layer.in_channels,
            "T": layer.out_channels,
            "kernel": list(layer.kernel_size),
            "params": layer.cost.params,
            "flops": layer.cost.flops,
            "methods": {},
        }
        why = dec.unsupported_reason(module)
        if layer.in_channels < min_in_channels:
            row["dense"] = True
            row["note"] = (
                f"kept dense by studies: {layer.in_channels} input channel(s) < min_in_channels "
                f"{min_in_channels}; a stem this thin saves almost nothing and costs an extra op"
            )
        if why is not None:
            row["note"] = f"{decomposer}: {why}"
        else:
            options = dec.default_options(module)
            for label, selector, params in methods:
                ranks = selector.select(module, dec, cache=cache, name=layer.name, options=options, **params)
                new, original, flops_known = layer_costs(dec, module, ranks, layer.input_hw, options)
                reason = cost_increase_reason(dec.name, ranks, new, original, flops_known, min_saving)
                if reason is None and row.get("dense"):  # a study leaves a thin stem full
                    reason = f"kept dense: {layer.in_channels} input channel(s) < min_in_channels {min_in_channels}"
                row["methods"][label] = {
                    "ranks": list(ranks),
                    "params": new.params,
                    "flops": new.flops,
                    "ratio": original.params / new.params if new.params else float("inf"),
                    "compressed": reason is None,
                    **({"reason": reason} if reason is not None else {}),
                }
        rows.append(row)
    return [m[0] for m in methods], rows


def layer_totals(model: Any, methods: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"params": total, "methods": {}}
    for m in methods:
        saved = sum(
            r["params"] - r["methods"][m]["params"]
            for r in rows
            if m in r["methods"] and r["methods"][m]["compressed"] and not r.get("dense")
        )
        out["methods"][m] = {"params": total - saved, "ratio": total / max(total - saved, 1)}
    return out


def _study_weights(source: str) -> bool:
    """Whether a study file names reference weights (then inspect loads them)."""
    if not source.endswith(STUDY_SUFFIXES):
        return False
    from rankopt.config.schema import load_config

    return bool(load_config(source, check_paths=False).reference.weights)


def load_run_reference(
    run_dir: Path, *, weights: Path | None = None, input_shape: Sequence[int] | None = None
) -> tuple[Any, tuple[int, ...], str]:
    """The reference model of a run directory, with its trained weights
    (``reference/model.pt``) and input shape (``reference/metrics.json``)."""
    from rankopt.deploy.artifacts import _build_base
    from rankopt.core.errors import ArtifactError
    from rankopt.results.reading import reference_path

    metrics_file = reference_path(run_dir)
    weights_file = weights or run_dir / "reference" / "model.pt"
    if not metrics_file.is_file() or not Path(weights_file).is_file():
        raise ConfigError(
            f"{str(run_dir)!r} is not a run directory with a trained reference (no "
            "reference/metrics.json and reference/model.pt); give a run directory that "
            "`rankopt run` wrote, a model name or a study file"
        )
    metrics = json.loads(metrics_file.read_text())
    base = metrics.get("base", {})
    if base.get("class"):
        raise ConfigError(
            f"run {str(run_dir)!r} was run on a module passed from Python ({base['class']}), "
            "which inspect cannot rebuild; in Python, rankopt.find_layers(model, input_shape) lists "
            "its layers, or `rankopt inspect module:factory --weights reference/model.pt`"
        )
    from rankopt.results.reading import StudyResult

    try:  # the run's own study file was trusted to import its factory; nothing else is
        run = StudyResult(run_dir)
        factory, kwargs, _ = _build_base(base, metrics_file, run.model_modules, run.model_folders)
        check_size_on_meta(factory, kwargs, f"{str(metrics_file)!r}: base.kwargs")
        model = factory(**kwargs)
    except ArtifactError as exc:
        raise ConfigError(str(exc)) from None
    from rankopt.core.safe_load import load_checked

    try:  # a run directory from elsewhere: its sizes are checked before anything is allocated
        state = load_checked(weights_file, f"reference weights {str(weights_file)!r}")
        model.load_state_dict(state)
    except (ArtifactError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"{str(weights_file)!r} does not hold the reference's weights: "
                          f"{str(exc).splitlines()[0]}") from None
    shape = tuple(input_shape or metrics.get("input_shape") or (1, *DEFAULT_SAMPLE_SHAPE))
    name = base.get("model") or base.get("callable")
    return model.eval(), shape, f"{name} (reference of {run_dir})"


@dataclass
class LayerTable:
    """What :func:`inspect_layers` found: one row per compressible layer (``layers``), the
    whole model under each method (``total``), and where the model came from."""

    label: str
    trained: bool
    input_shape: tuple[int, ...]
    decomposer: str
    methods: list[str]
    layers: list[dict[str, Any]]
    total: dict[str, Any] = field(default_factory=dict)
    census: Any = None  # the layers compressible, refused and skipped (rankopt.compression.layer_census)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form ``rankopt inspect --format json`` prints."""
        out = {
            "model": self.label, "trained": self.trained, "input_shape": list(self.input_shape),
            "decomposer": self.decomposer, "methods": self.methods, "layers": self.layers, "total": self.total,
        }
        if self.census is not None:
            out["census"] = self.census.as_dict()
        return out

    def to_csv(self) -> str:
        """One line per layer, five columns per method (``rankopt inspect --format csv``)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        header = ["layer", "kind", "S", "T", "kernel", "params", "flops"]
        for m in self.methods:
            header += [f"{m}_ranks", f"{m}_params", f"{m}_flops", f"{m}_ratio", f"{m}_compressed"]
        writer.writerow(header)
        for r in self.layers:
            line = [r["layer"], r["kind"], r["S"], r["T"], "x".join(str(k) for k in r["kernel"]), r["params"], r["flops"]]
            for m in self.methods:
                e = r["methods"].get(m)
                line += (
                    ["/".join(str(x) for x in e["ranks"]), e["params"], e["flops"], f"{e['ratio']:.4f}", e["compressed"]]
                    if e else ["", "", "", "", ""]
                )
            writer.writerow(line)
        return buf.getvalue()


def inspect_layers(
    source: str | Path | nn.Module,
    *,
    weights: Path | None = None,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    decomposer: str = "tucker2",
    thresholds: Sequence[float] = (0.92, 0.95, 0.98),
    cache_dir: Path | None = None,
    seed: int = 0,
    min_in_channels: int | None = None,
    min_saving: float | None = None,
) -> LayerTable:
    """Each compressible layer's shape, its EVBMF and energy-threshold ranks, and what they save.

    ``source``: an ``nn.Module``, a registered model name, ``package.module:callable``, a
    study file, or a run directory (its trained reference). ``min_in_channels`` and
    ``min_saving`` default to the study file's targets, else to a study's defaults (4 and
    0.1). A random (untrained) model says little: ``trained`` tells which it was.

    Example::

        table = rankopt.inspect_layers("resnet20", input_shape=(1, 3, 32, 32))
        table.layers[0]["methods"]["vbmf"]["ranks"]
    """
    from rankopt.compression.spectral import SpectralCache, get_default_cache

    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes}")
    ps = [float(p) for p in thresholds]
    if not ps or any(not 0.0 < p <= 1.0 for p in ps):
        raise ConfigError(f"thresholds must be numbers in (0, 1] like 0.92,0.95,0.98, got {list(thresholds)}")
    if input_shape is not None and (len(input_shape) < 2 or any(int(d) < 1 for d in input_shape)):
        raise ConfigError(f"input_shape must be positive integers, batch first (e.g. 1,3,32,32), got {input_shape}")
    text = str(source) if not isinstance(source, nn.Module) else ""
    if text.endswith(STUDY_SUFFIXES) and (min_in_channels is None or min_saving is None):
        from rankopt.config.schema import load_config

        study_targets = load_config(text, check_paths=False).targets
        if min_in_channels is None:
            min_in_channels = study_targets.dense_input_channels + 1
        if min_saving is None:
            min_saving = study_targets.min_saving
    if min_saving is None:
        from rankopt.config.sections import TargetsConfig

        min_saving = TargetsConfig().min_saving  # a study's default
    min_in_channels = 4 if min_in_channels is None else min_in_channels
    if min_in_channels < 1:
        raise ConfigError(f"min_in_channels must be an integer >= 1, got {min_in_channels}")
    if not 0 <= min_saving < 1:
        raise ConfigError(f"min_saving must be a number in [0, 1), got {min_saving}")
    from rankopt.contract.manager import get_registry

    get_registry().create("decomposers", decomposer)  # an unknown name fails before any work
    if isinstance(source, nn.Module):
        model = source.eval()
        shape = tuple(input_shape or (1, *DEFAULT_SAMPLE_SHAPE))
        label, trained = type(source).__name__, True
    elif Path(text).is_dir():
        model, shape, label = load_run_reference(Path(text), weights=weights, input_shape=input_shape)
        trained = True
    else:
        model, shape, label = load_model(
            text, weights=weights, num_classes=num_classes, input_shape=input_shape, seed=seed
        )
        trained = weights is not None or _study_weights(text)
    cache = SpectralCache(cache_dir) if cache_dir is not None else get_default_cache()
    methods, rows = inspect_rows(
        model, shape, decomposer=decomposer, thresholds=ps, cache=cache, min_in_channels=min_in_channels,
        min_saving=min_saving,
    )
    from rankopt.compression.layer_census import layer_census

    census = layer_census(model, shape)  # with a study's default decomposers
    return LayerTable(label, trained, tuple(shape), decomposer, methods, rows, layer_totals(model, methods, rows),
                      census)
