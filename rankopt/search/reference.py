"""The reference model of a study: trained (or loaded) once, cached in ``RUN_DIR/reference/``.

The cache is keyed by a hash of everything the reference depends on (model, data,
``reference`` settings, seed, input shape): a changed config retrains it, and a run
directory whose completed trials used another reference is refused, since their
accuracies would not be comparable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn as nn
from optuna.trial import TrialState

from rankopt.compression.accounting import count
from rankopt.config.schema import StudyConfig
from rankopt.core.errors import ConfigError
from rankopt.contract.dataset import DatasetSplits
from rankopt.search.layout import reference_path
from rankopt.search.artifact_store import ArtifactStore
from rankopt.search.layout import write_json
from rankopt.compression.surgery import LayerInfo
from rankopt.core.safe_paths import atomic_write

__all__ = [
    "fingerprint_module",
    "reference_key",
    "check_reference_key",
    "obtain_reference",
    "describe_reference",
    "warn_weak_reference",
]

# the study's logger: its warnings read as the study's (and tests listen to it)
log = logging.getLogger("rankopt.study")


def fingerprint_module(model: nn.Module) -> str:
    """A hash of a module's class and weights."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_key(
    config: StudyConfig,
    base: Mapping[str, Any],
    input_shape: Sequence[int],
    user_model: nn.Module | None = None,
    user_data: DatasetSplits | None = None,
) -> str:
    """A hash of everything the reference model depends on; a change retrains it."""
    data: Any = config.data.model_dump(mode="json")
    if data.get("test_fraction") is None:
        data.pop("test_fraction", None)  # keys of runs made before the field stay valid
    if user_data is not None:
        data = {
            "user": [type(user_data.train).__name__, len(user_data.train), len(user_data.val)],  # type: ignore[arg-type]
            "num_classes": user_data.num_classes,
            "batch_size": config.data.batch_size,
        }
        if config.data.test_fraction:
            data["test_fraction"] = config.data.test_fraction
    model: Any = dict(base) if user_model is None else fingerprint_module(user_model)
    reference = config.reference.model_dump(mode="json")
    if config.reference.weights:
        weights = Path(config.reference.weights)
        reference["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    blob = json.dumps(
        {"model": model, "data": data, "reference": reference, "seed": config.seed,
         "input_shape": list(input_shape)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_reference_key(
    study: optuna.Study, key: str, run_dir: Path, weights_sha256: str | None = None
) -> None:
    """Refuse a run directory whose completed trials used another reference model: another
    config (``key``) or, given ``weights_sha256``, other weights (e.g. a reference that
    another machine trained separately)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    others = {t.user_attrs.get("reference_key") for t in complete} - {key, None}
    if weights_sha256 is not None:
        weights = {t.user_attrs.get("reference_weights") for t in complete} - {weights_sha256, None}
        if weights:
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds trials that compressed other reference "
                f"weights (sha256 {sorted(w[:12] for w in weights)}, now {weights_sha256[:12]}): "
                "another machine trained its own reference; share one through artifacts: "
                "(an fsspec URL every machine reaches), or start a new study"
            )
    if others:
        raise ConfigError(
            f"run directory {str(run_dir)!r} holds trials of a different model, data or "
            f"reference config (reference {sorted(others)}, now {key}); their accuracies "
            "are not comparable: use another --run-dir, or delete this one to start over"
        )


def _epoch_reporter(report: Callable[[str], None], model: nn.Module, val_loader: Any,
                    batches_per_epoch: int, device: Any) -> Callable[[int, int, float], None]:
    """A ``train(progress=...)`` callback that reports each epoch of the reference: mean
    loss, validation accuracy and the time left (from the pace so far)."""
    from rankopt.training.loop import evaluate

    start = time.perf_counter()
    losses: list[float] = []

    def on_step(step: int, total: int, loss: float) -> None:
        losses.append(loss)
        if step % batches_per_epoch and step != total:
            return
        # a loader draws a base seed from the global RNG: fork it so that reporting leaves
        # the training (augmentation, dropout) exactly as without it
        with torch.random.fork_rng(devices=[]):
            accuracy = evaluate(model, val_loader, device=device)  # eval mode, restored after
        elapsed = time.perf_counter() - start
        eta = elapsed / step * (total - step)
        report(
            f"  reference epoch {math.ceil(step / batches_per_epoch)}/"
            f"{math.ceil(total / batches_per_epoch)}: loss {sum(losses) / len(losses):.4f}, "
            f"val accuracy {accuracy:.4f}, {elapsed:.0f} s, eta {eta:.0f} s"
        )
        losses.clear()

    return on_step


def obtain_reference(
    config: StudyConfig,
    *,
    model: nn.Module,
    splits: DatasetSplits,
    input_shape: tuple[int, ...],
    base: Mapping[str, Any],
    targets: Sequence[LayerInfo],
    key: str,
    run_dir: Path,
    report: Callable[[str], None] | None = None,
    store: ArtifactStore | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The reference model (on CPU, eval mode) and its metrics: loaded from ``reference/``
    when cached under ``key`` (or fetched from the artifact ``store``, where another
    machine put it), else trained (or loaded from ``reference.weights``), measured, cached
    there and put in the store. With ``backend: ray`` and ``reference.on: cluster`` the
    training runs as a Ray task with one trial's resources, so the driver needs no GPU.

    The metrics carry ``weights_sha256`` (:func:`fingerprint_module` of the weights): every
    trial checks it, and trials that compressed other weights are refused as not
    comparable (:func:`check_reference_key`)."""
    ref_dir = run_dir / "reference"
    weights_file = ref_dir / "model.pt"
    metrics_file = reference_path(run_dir)
    for source in ("cache", "store"):
        if source == "store" and (store is None or not store.fetch_reference(ref_dir)):
            continue
        if metrics_file.is_file() and weights_file.is_file():
            cached = json.loads(metrics_file.read_text())
            if cached.get("key") == key:
                model.load_state_dict(_stored_weights(weights_file))
                model = model.cpu().eval()
                if "weights_sha256" not in cached:  # cached before content hashes
                    cached["weights_sha256"] = fingerprint_module(model)
                if store is not None and source == "cache":
                    store.put_reference(ref_dir)
                return model, cached
    if config.backend == "ray" and config.reference.on == "cluster":
        import ray

        resources = config.resources
        task = ray.remote(num_cpus=resources.cpus, num_gpus=resources.gpus, max_retries=0)(
            train_reference
        )
        state, metrics = ray.get(task.remote(config, model, splits, input_shape))
        model.load_state_dict(state)
    else:
        state, metrics = train_reference(config, model, splits, input_shape, report=report)
    model = model.cpu().eval()
    if store is not None and store.fetch_reference(ref_dir):
        # another machine put its reference while this one trained: use that one, so every
        # trial of the study compresses the same weights
        cached = json.loads(metrics_file.read_text())
        if cached.get("key") == key and weights_file.is_file():
            model.load_state_dict(_stored_weights(weights_file))
            return model.cpu().eval(), cached
    metrics = {
        "key": key,
        **metrics,
        "base": dict(base),
        "layers": [
            {"name": t.name, "kind": t.kind, "in_channels": t.in_channels,
             "out_channels": t.out_channels, "kernel_size": list(t.kernel_size),
             "params": t.cost.params, "flops": t.cost.flops}
            for t in targets
        ],
        "weights_sha256": fingerprint_module(model),
    }
    state = model.state_dict()
    atomic_write(weights_file, lambda f: torch.save(state, f), root=run_dir)
    write_json(metrics_file, metrics, root=run_dir)
    if store is not None:
        store.put_reference(ref_dir)
    return model, metrics


def train_reference(
    config: StudyConfig,
    model: nn.Module,
    splits: DatasetSplits,
    input_shape: tuple[int, ...],
    report: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train (or load) and measure the reference where this runs; returns its CPU
    state_dict and metrics. The device is resolved here (a Ray task resolves its own).
    ``report`` gets a line per epoch (loss, validation accuracy, ETA)."""
    from rankopt.training.devices import resolve_device
    from rankopt.training.loop import evaluate, train
    from rankopt.training.trial import loader_for

    device = resolve_device(config.device)
    start = time.perf_counter()
    ref = config.reference
    if ref.weights:
        state = torch.load(ref.weights, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(
                f"reference.weights: {ref.weights!r} does not fit the model: "
                f"{str(exc).splitlines()[0]}"
            ) from None
    model.to(device)
    if ref.epochs > 0:
        loader = loader_for(
            splits.train, batch_size=config.data.batch_size, shuffle=True, seed=config.seed
        )
        reporter = None if report is None else _epoch_reporter(
            report, model, loader_for(splits.val, batch_size=config.data.batch_size), len(loader), device)
        train(
            model,
            loader,
            progress=reporter,
            epochs=ref.epochs,
            lr=ref.lr,
            optimizer=ref.optimizer,
            schedule=ref.schedule,
            weight_decay=ref.weight_decay,
            device=device,
            seed=config.seed,
        )
    val_loader = loader_for(splits.val, batch_size=config.data.batch_size)
    accuracy = evaluate(model, val_loader, device=device)
    cost = count(model, input_shape, device=device)
    metrics: dict[str, Any] = {
        "accuracy": accuracy,
        "params": cost.params,
        "flops": cost.flops,
        "input_shape": list(input_shape),
        "obtained": f"weights {ref.weights}" if ref.weights else f"trained {ref.epochs:g} epochs",
        "seconds": time.perf_counter() - start,
        "device": str(device),
    }
    if "latency" in config.objectives:
        from rankopt.compression.latency import measure_model_latency

        lat = config.latency
        timed = measure_model_latency(
            model, model, input_shape, runtime=lat.runtime, batch=lat.batch,
            threads=lat.threads, rounds=lat.rounds, device=device,
        )
        metrics.update(
            latency_ms=timed["latency_reference_ms"], latency_runtime=lat.runtime, latency_batch=lat.batch
        )
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state_dict, metrics


def describe_reference(config: StudyConfig) -> str:
    """How the run obtains the reference, for the progress display."""
    ref = config.reference
    if ref.weights:
        return f"loading {ref.weights}"
    if ref.epochs == 0:
        return "the model as given"
    return f"training {ref.epochs:g} epochs, or the cached one"


def warn_weak_reference(baseline: Mapping[str, Any], num_classes: int) -> None:
    """A reference below twice chance accuracy has little to lose: its compressed trials
    say nothing about a trained model's."""
    chance = 1.0 / max(1, int(num_classes))
    if baseline["accuracy"] < min(2 * chance, 0.99):
        log.warning(
            "the reference model is weak: validation accuracy %.4f is below twice chance "
            "(%.4f for %d classes); train it longer (reference.epochs, reference.lr) or give "
            "trained reference.weights before trusting the front", baseline["accuracy"],
            2 * chance, num_classes,
        )


def _stored_weights(path: Path) -> Any:
    """A stored reference's state_dict (the run directory's or the artifact store's, which
    may come from elsewhere): its sizes checked on the meta device before loading."""
    from rankopt.core.safe_load import load_checked

    return load_checked(path, f"stored reference weights {str(path)!r}")
