"""Studies end to end: validate, train (or load) the reference once, search, summarize.

>>> result = rankopt.run_study("studies/quickstart.yaml", trials=8)
>>> result.front()          # Pareto-optimal trials
>>> rankopt.Study(config, model=my_net, data=DatasetSplits(...)).run()

Everything is checked before any work starts (no run directory is created for a bad
study). A rerun of a study continues it: ``trials`` is the total wanted, completed
trials are never recomputed, and trials a dead process left RUNNING are marked FAIL
and run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn as nn
from optuna.trial import TrialState

from rankopt.accounting import count
from rankopt.config import StudyConfig, config_to_yaml, import_callable, load_config
from rankopt.errors import ConfigError, RankoptError
from rankopt.plugins.datasets.base import DatasetSplits
from rankopt.results import STUDY_FILE, StudyResult, reference_path
from rankopt.search.local import quiet_optuna
from rankopt.search.objective import TrialEnv, measure_latency_ms, write_json
from rankopt.search.space import SearchSpace
from rankopt.surgery import LayerInfo, find_layers

__all__ = ["Study", "StudyResult", "run_study", "make_sampler", "ConstraintsFunc"]

log = logging.getLogger("rankopt.study")


def run_study(
    path_or_config: str | os.PathLike[str] | Mapping[str, Any] | StudyConfig,
    *,
    model: nn.Module | None = None,
    data: DatasetSplits | None = None,
    progress: bool | None = None,
    **overrides: Any,
) -> StudyResult:
    """Run (or continue) the study in a file or mapping; ``overrides`` replace top-level keys
    (``trials=8``, ``run_dir="runs/x"``, ``backend="ray"``, ``sampler={"seed": 1}``)."""
    return Study(path_or_config, model=model, data=data, progress=progress, **overrides).run()


class ConstraintsFunc:
    """Optuna ``constraints_func``: ``value - limit`` per limit (<= 0 is feasible).

    A module-level class (not a closure) so the sampler pickles for Ray.
    """

    def __init__(self, max_params: float | None, max_flops: float | None) -> None:
        self.limits = [(k, v) for k, v in (("params", max_params), ("flops", max_flops)) if v is not None]

    def __call__(self, trial: optuna.trial.FrozenTrial) -> list[float]:
        out = []
        for key, limit in self.limits:
            value = trial.user_attrs.get(key)
            out.append(float(value) - float(limit) if value is not None else 1.0)
        return out


def make_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study's Optuna sampler, told the constraints when there are any."""
    opts = dict(config.sampler.options)
    constraints = None
    if config.constraints.max_params is not None or config.constraints.max_flops is not None:
        constraints = ConstraintsFunc(config.constraints.max_params, config.constraints.max_flops)
    cls: Any = {
        "nsgaii": optuna.samplers.NSGAIISampler,
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
    }[config.sampler.name]
    kwargs: dict[str, Any] = {"seed": config.sampler.seed, **opts}
    if constraints is not None:
        if config.sampler.name == "random":
            raise ConfigError(
                "constraints: the random sampler cannot use constraints; use sampler.name "
                "'nsgaii' or 'tpe', or drop the constraints"
            )
        kwargs["constraints_func"] = constraints
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(opts) - set(params))
    if unknown:
        allowed = sorted(p for p in params if p not in ("self", "seed", "constraints_func"))
        raise ConfigError(
            f"sampler.options: {config.sampler.name} has no option(s) {unknown}; its options "
            f"are {allowed}"
        )
    try:
        return cls(**kwargs)  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sampler.options: {exc}") from None


@dataclass
class _Prepared:
    config: StudyConfig
    run_dir: Path
    splits: DatasetSplits
    model: nn.Module
    base: dict[str, Any]
    input_shape: tuple[int, ...]
    targets: list[LayerInfo]
    space: SearchSpace
    storage_url: str
    enqueue: list[dict[str, Any]]
    sampler: optuna.samplers.BaseSampler


class Study:
    """A study from a config (path, mapping or :class:`StudyConfig`), with optional Python
    objects in place of the config's model and data.

    Args:
        config: the study file, a mapping of its keys, or a validated config.
        model: an ``nn.Module`` to use instead of ``config.model`` (it is copied; trained
            per ``config.reference`` unless ``reference.epochs`` is 0).
        data: :class:`~rankopt.DatasetSplits` to use instead of ``config.data`` (its
            ``train``/``val`` may be Datasets or DataLoaders).
        progress: show the live display (default: when stderr is a terminal).
        overrides: top-level config keys to replace (``trials``, ``run_dir``, ...).
    """

    def __init__(
        self,
        config: str | os.PathLike[str] | Mapping[str, Any] | StudyConfig,
        *,
        model: nn.Module | None = None,
        data: DatasetSplits | None = None,
        progress: bool | None = None,
        **overrides: Any,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        if data is not None and not isinstance(data, DatasetSplits):
            raise ConfigError(
                f"data must be rankopt.DatasetSplits(train, val, num_classes, input_shape), "
                f"got {type(data).__name__}"
            )
        self.config = load_config(config, **overrides)
        if model is None and self.config.model is None:
            raise ConfigError("model: required (a registered name or 'package.module:callable'), "
                              "unless a model is passed to Study(..., model=...)")
        if data is None and self.config.data.name is None:
            raise ConfigError("data.name: required (a registered dataset), unless data is "
                              "passed to Study(..., data=DatasetSplits(...))")
        self.user_model = model
        self.user_data = data
        self.progress = progress

    @property
    def run_dir(self) -> Path:
        return self.config.resolved_run_dir()

    # -- preparation (no side effects on disk) ------------------------------------------
    def _prepare(self) -> _Prepared:
        from rankopt.devices import resolve_device
        from rankopt.manager import get_registry

        config = self.config
        resolve_device(config.device)
        _check_backend(config)
        if self.user_data is not None:
            splits = self.user_data
        else:
            assert config.data.name is not None
            splits = get_registry().create("datasets", config.data.name, **config.data.kwargs)
        input_shape = (1, *tuple(int(d) for d in splits.input_shape))
        from rankopt.training import seed_everything

        seed_everything(config.seed)  # the reference's initial weights follow the study seed
        if self.user_model is not None:
            import copy

            model = copy.deepcopy(self.user_model).cpu()
            base = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
        else:
            assert config.model is not None
            model, base = _build_model(config, splits)
        targets = find_layers(
            model, input_shape, include=config.targets.include, exclude=config.targets.exclude
        )
        if not targets:
            names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            raise ConfigError(
                f"targets: include {config.targets.include} / exclude {config.targets.exclude} "
                f"match no Conv2d or Linear layer; the model's layers are {names}"
            )
        space = SearchSpace(config, model, targets)
        enqueue = [space.check_point(p, f"enqueue[{i}]") for i, p in enumerate(config.enqueue)]
        run_dir = self.run_dir
        storage_url = config.storage or ""
        return _Prepared(config, run_dir, splits, model, base, input_shape, targets, space,
                         storage_url, enqueue, make_sampler(config))

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> StudyResult:
        """Run the missing trials and return the results (see :class:`StudyResult`)."""
        from rankopt.search.storage import open_storage

        prep = self._prepare()
        config = prep.config
        storage = open_storage(prep.storage_url) if prep.storage_url else None
        started_ray = False
        if config.backend == "ray":
            from rankopt.search.ray_backend import connect

            started_ray = connect(config)
        try:
            return self._run(prep, storage)
        finally:
            if started_ray:
                import ray

                ray.shutdown()

    def _run(self, prep: _Prepared, storage: Any) -> StudyResult:
        from rankopt.search.progress import StudyProgress
        from rankopt.search.storage import (
            RunLock,
            default_storage_url,
            fail_stale_trials,
            is_local_sqlite,
            open_storage,
        )

        config = prep.config
        run_dir = prep.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        with RunLock(run_dir), torch_threads(config.resources.cpus):
            (run_dir / STUDY_FILE).write_text(
                "# the resolved study config, as run (storage: null is optuna.db here)\n"
                + config_to_yaml(config)
            )
            if storage is None:
                storage = open_storage(default_storage_url(run_dir))
            with quiet_optuna():
                study = _create_study(config, storage, prep.sampler)
            url = config.storage or default_storage_url(run_dir)
            stale = fail_stale_trials(study, storage, all_running=is_local_sqlite(url))
            if stale:
                log.warning("marked trials %s FAIL: a process that died left them running", stale)
            key = _reference_key(config, prep, self.user_model, self.user_data)
            _check_reference_key(study, key, run_dir)
            reference, baseline = _obtain_reference(config, prep, key, run_dir)
            env = TrialEnv(
                config=config,
                run_dir=run_dir.resolve(),
                reference=reference,
                splits=prep.splits,
                input_shape=prep.input_shape,
                targets=prep.targets,
                space=prep.space,
                baseline=baseline,
                base=prep.base,
                reference_key=key,
            )
            if not study.trials:
                for point in prep.enqueue:
                    study.enqueue_trial(point, skip_if_exists=True)
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            missing = None if config.trials is None else max(0, config.trials - done)
            outcomes: list[str] = []

            def on_trial_done(number: int, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
                outcomes.append(str(metrics.get("state")))
                progress.trial_done(number, values, metrics)
                _call_trial_hook(run_dir, number, values, metrics)

            with StudyProgress(missing, enabled=self.progress, baseline=baseline) as progress:
                if missing == 0:
                    progress.message(f"study {config.name!r}: all {config.trials} trials are done")
                elif config.backend == "local":
                    from rankopt.search.local import run_local

                    run_local(
                        env,
                        study,
                        n_trials=missing,
                        timeout=config.timeout,
                        n_jobs=config.max_concurrent,
                        on_trial_done=on_trial_done,
                    )
                else:
                    from rankopt.search.ray_backend import run_ray

                    run_ray(env, study, storage, n_trials=missing, on_trial_done=on_trial_done)
            result = StudyResult(run_dir, config)
            summary = result.status()
            write_json(run_dir / "summary.json", summary)
            _call_study_hook(run_dir, summary)
        if outcomes and all(s != "COMPLETE" for s in outcomes):
            reasons = [
                t.user_attrs.get("reason", "?")
                for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            ]
            raise RankoptError(
                f"all {len(outcomes)} trials of study {config.name!r} failed; the last reason: "
                f"{reasons[-1] if reasons else '?'} (see {run_dir}/trials/*/metrics.json)"
            )
        return result


# -- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(cpus: float) -> Iterator[None]:
    """Run with torch's intra-op threads set to a trial's CPUs (restored afterwards).

    Small models train several times faster on one thread than on an oversubscribed
    pool; Ray workers get the same from Ray's OMP_NUM_THREADS.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, math.ceil(cpus)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _check_backend(config: StudyConfig) -> None:
    gpus = config.resources.gpus
    if config.backend == "ray":
        try:
            import ray  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"backend: 'ray' needs ray[tune] and optuna installed ({exc}); "
                "pip install 'ray[tune]'"
            ) from None
        address = config.address or os.environ.get("RAY_ADDRESS")
        if gpus > 0 and not address and torch.cuda.device_count() < math.ceil(gpus):
            raise ConfigError(
                f"resources.gpus: {gpus:g} GPU(s) per trial requested, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); set resources.gpus: 0, or run "
                "on a GPU machine or Ray cluster (--address)"
            )
    elif gpus > 0:
        if torch.cuda.device_count() < math.ceil(gpus):
            raise ConfigError(
                f"resources.gpus: {gpus:g} GPU(s) per trial requested, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); set resources.gpus: 0"
            )


def _build_model(config: StudyConfig, splits: DatasetSplits) -> tuple[nn.Module, dict[str, Any]]:
    from rankopt.manager import get_registry

    assert config.model is not None
    name, kwargs = config.model.name, dict(config.model.kwargs)
    if ":" in name:
        factory = import_callable(name, "model.name")
    else:
        factory = get_registry().record("models", name).factory
    accepts = _accepted(factory)
    for key, value in (("num_classes", splits.num_classes), ("in_channels", splits.input_shape[0])):
        if key not in kwargs and (accepts is None or key in accepts):
            kwargs[key] = int(value)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: {name!r} returned {type(model).__name__}, not an nn.Module")
    base = {"callable": name, "kwargs": kwargs} if ":" in name else {"model": name, "kwargs": kwargs}
    return model, base


def _accepted(fn: Any) -> set[str] | None:
    """Keyword names ``fn`` accepts (None when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _create_study(config: StudyConfig, storage: Any, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    try:
        return optuna.create_study(
            storage=storage,
            study_name=config.name,
            directions=config.directions,
            sampler=sampler,
            load_if_exists=True,
        )
    except ValueError as exc:
        raise ConfigError(
            f"objectives: the storage already holds study {config.name!r} with other "
            f"objectives ({exc}); use another name or run directory"
        ) from None


def _fingerprint_module(model: nn.Module) -> str:
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for key, tensor in model.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _reference_key(
    config: StudyConfig, prep: _Prepared, user_model: nn.Module | None, user_data: DatasetSplits | None
) -> str:
    """A hash of everything the reference model depends on; a change retrains it."""
    data: Any = config.data.model_dump(mode="json")
    if user_data is not None:
        data = {
            "user": [type(user_data.train).__name__, len(user_data.train), len(user_data.val)],  # type: ignore[arg-type]
            "num_classes": user_data.num_classes,
            "batch_size": config.data.batch_size,
        }
    model: Any = prep.base if user_model is None else _fingerprint_module(user_model)
    reference = config.reference.model_dump(mode="json")
    if config.reference.weights:
        weights = Path(config.reference.weights)
        reference["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    blob = json.dumps(
        {"model": model, "data": data, "reference": reference, "seed": config.seed,
         "input_shape": list(prep.input_shape)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_reference_key(study: optuna.Study, key: str, run_dir: Path) -> None:
    others = {
        t.user_attrs.get("reference_key")
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    } - {key, None}
    if others:
        raise ConfigError(
            f"run directory {str(run_dir)!r} holds trials of a different model, data or "
            f"reference config (reference {sorted(others)}, now {key}); their accuracies "
            "are not comparable: use another --run-dir, or delete this one to start over"
        )


def _obtain_reference(
    config: StudyConfig, prep: _Prepared, key: str, run_dir: Path
) -> tuple[nn.Module, dict[str, Any]]:
    """Load the cached reference of this key, or train/load it and cache it in ``reference/``."""
    from rankopt.devices import resolve_device
    from rankopt.training import evaluate, make_loader, train

    model = prep.model
    ref_dir = run_dir / "reference"
    weights_file = ref_dir / "model.pt"
    metrics_file = reference_path(run_dir)
    if metrics_file.is_file() and weights_file.is_file():
        cached = json.loads(metrics_file.read_text())
        if cached.get("key") == key:
            model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
            return model.cpu().eval(), cached
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
        loader = make_loader(
            prep.splits.train, batch_size=config.data.batch_size, shuffle=True, seed=config.seed
        )
        train(
            model,
            loader,
            epochs=ref.epochs,
            lr=ref.lr,
            optimizer=ref.optimizer,
            schedule=ref.schedule,
            weight_decay=ref.weight_decay,
            device=device,
            seed=config.seed,
        )
    val = prep.splits.val
    from torch.utils.data import DataLoader

    val_loader = val if isinstance(val, DataLoader) else make_loader(val, batch_size=config.data.batch_size)
    accuracy = evaluate(model, val_loader, device=device)
    cost = count(model, prep.input_shape, device=device)
    metrics: dict[str, Any] = {
        "key": key,
        "accuracy": accuracy,
        "params": cost.params,
        "flops": cost.flops,
        "input_shape": list(prep.input_shape),
        "base": prep.base,
        "layers": [
            {"name": t.name, "kind": t.kind, "in_channels": t.in_channels,
             "out_channels": t.out_channels, "kernel_size": list(t.kernel_size),
             "params": t.cost.params, "flops": t.cost.flops}
            for t in prep.targets
        ],
        "obtained": f"weights {ref.weights}" if ref.weights else f"trained {ref.epochs:g} epochs",
        "seconds": time.perf_counter() - start,
        "device": str(device),
    }
    if "latency" in config.objectives:
        metrics["latency_ms"] = measure_latency_ms(model, prep.input_shape, device)
    model = model.cpu().eval()
    ref_dir.mkdir(parents=True, exist_ok=True)
    tmp = weights_file.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(weights_file)
    write_json(metrics_file, metrics)
    return model, metrics


def _call_trial_hook(run_dir: Path, number: int, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
    from rankopt.manager import get_registry

    hook_metrics = {k: v for k, v in metrics.items() if k not in ("traceback",)}
    get_registry().pm.hook.rankopt_trial_finished(
        run_dir=run_dir, trial_number=number, params=dict(values), metrics=hook_metrics
    )


def _call_study_hook(run_dir: Path, summary: Mapping[str, Any]) -> None:
    from rankopt.manager import get_registry

    get_registry().pm.hook.rankopt_study_finished(run_dir=run_dir, summary=dict(summary))
