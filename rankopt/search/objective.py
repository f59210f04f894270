"""One trial, the same on every backend: build the context, run the strategy, evaluate,
count, and write ``trials/<number>/`` (``model.pt`` and ``metrics.json``).

:class:`TrialEnv` is everything a trial needs besides its parameters; it is built
once per study in the driver and shipped to Ray workers as is (it pickles).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import socket
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch
import torch.nn as nn

from rankopt.compression.accounting import count
from rankopt.deploy.artifacts import save_compressed
from rankopt.config.schema import StudyConfig, resolve_rank_multiple
from rankopt.contract.dataset import DatasetSplits
from rankopt.core.errors import UnsafePathError
from rankopt.core.safe_paths import clear_dir, is_link, make_dirs
from rankopt.search.artifact_store import ArtifactStore
from rankopt.search.layout import _run_dir_of, write_json
from rankopt.search.repeats import REPEATED, find_repeat, jsonable, resolved_key
from rankopt.search.repeats import training_seed
from rankopt.search.space import SearchSpace, TrialPlan
from rankopt.compression.spectral import SpectralCache, set_default_cache
from rankopt.compression.surgery import LayerInfo, normalize_spec

if TYPE_CHECKING:  # annotations only; trial_context imports it when a trial runs
    from rankopt.training.trial import LocalTrialContext

__all__ = [
    "SET_CONSTRAINT",
    "set_constraints",
    "TrialEnv",
    "run_trial",
    "trial_context",
    "objective_values",
    "ranks_summary",
    "write_json",
    "clean_trial_dir",
    "TRIAL_ATTRS",
    "interrupt_guard",
    "interrupts",
    "INTERRUPTED",
    "INTERRUPT_SIGNAL",
]

log = logging.getLogger("rankopt.study")

# set by the SIGINT/SIGTERM handler of interrupt_guard: a KeyboardInterrupt with it set is
# the user's Ctrl-C or a SIGTERM (stop the study); without it, a plugin raised it (fail
# only that trial)
INTERRUPTED = threading.Event()
# the name of the signal that set INTERRUPTED ("SIGINT", "SIGTERM"), for the message
INTERRUPT_SIGNAL: list[str] = []


@contextlib.contextmanager
def interrupt_guard() -> Iterator[None]:
    """While a study runs, Ctrl-C (SIGINT) and SIGTERM (``docker stop``, systemd,
    ``timeout``) set :data:`INTERRUPTED` and raise KeyboardInterrupt: the running trial is
    marked FAIL (``interrupted``) and the run stops with one message, as for Ctrl-C.

    Only the main thread can install a signal handler; elsewhere nothing changes.
    """
    INTERRUPTED.clear()
    INTERRUPT_SIGNAL.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        INTERRUPT_SIGNAL[:] = [signal.Signals(signum).name]
        INTERRUPTED.set()
        if _DEFERRED[0]:
            _PENDING[:] = [signum]  # raised where interrupts are allowed again
            return
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    _DEFERRED[0], _PENDING[:] = 0, []
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


# main thread only: > 0 inside interrupts(deferred=True), where the handler only notes a signal
_DEFERRED = [0]
_PENDING: list[int] = []


@contextlib.contextmanager
def interrupts(*, deferred: bool) -> Iterator[None]:
    """``deferred=True``: a Ctrl-C or SIGTERM that comes in the block is raised when it
    ends (or where a nested ``interrupts(deferred=False)`` allows it), so that storage
    steps that must go together (ask a trial and name its process; store its result)
    are never cut in half, which would leave a RUNNING trial no process owns.
    ``deferred=False``: interrupts are raised at once (a trial's own work). Nests;
    only the main thread receives signals, elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = _DEFERRED[0]
    _DEFERRED[0] = before + 1 if deferred else 0
    try:
        if not _DEFERRED[0]:
            _raise_pending()
        yield
    finally:
        _DEFERRED[0] = before
    if not _DEFERRED[0]:
        _raise_pending()


def _raise_pending() -> None:
    if _PENDING:
        _PENDING.clear()
        raise KeyboardInterrupt

# the metrics copied into the trial's user attrs in the Optuna storage
TRIAL_ATTRS = (
    "strategy",
    "selector",
    "hyperparameters",
    "selector_params",
    "accuracy",
    "params",
    "flops",
    "latency_ms",
    "latency_reference_ms",
    "latency_ratio",
    "latency_runtime",
    "latency_batch",
    "params_compression",
    "flops_compression",
    "ranks_summary",
    "ranks",
    "decomposers",
    "reason",
    "reference_key",
    "resolved_key",
    "repeat_of",
    "fidelity",
    "continued_from",
    "train_epochs",
    "reference_weights",
    "node",
    "artifact_seconds",
    # a model sent home through Ray (no artifact store): its bytes and seconds
    "transfer_bytes",
    "transfer_seconds",
)


@dataclass
class TrialEnv:
    """What every trial of a study shares."""

    config: StudyConfig
    run_dir: Path
    reference: nn.Module  # trained, on CPU
    splits: DatasetSplits
    input_shape: tuple[int, ...]  # batch 1
    targets: list[LayerInfo]
    space: SearchSpace
    baseline: dict[str, Any]  # accuracy, params, flops (latency_ms when measured)
    base: dict[str, Any]  # how load_compressed rebuilds the architecture
    reference_key: str
    # where trial folders travel between machines (None: the run directory is the only place)
    store: ArtifactStore | None = None
    _cache: SpectralCache | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # each process opens the on-disk cache itself
        return state

    @property
    def cache(self) -> SpectralCache:
        if self._cache is None:
            self._cache = SpectralCache(self.run_dir / "cache" / "spectra")
            # decomposers read the process-wide cache: share one SVD per weight with selectors
            set_default_cache(self._cache)
        return self._cache

    def trial_dir(self, number: int) -> Path:
        return self.run_dir / "trials" / str(number)


def clean_trial_dir(trial_dir: Path, *, reason: str | None = None) -> None:
    """Remove a failed trial's partial files (a model file, half-written temporaries).

    With ``reason`` (a trial a dead process left), also write its ``metrics.json`` as
    FAIL, since the process could not (when it had begun the folder).

    Never acts outside the run directory: a ``trial_dir`` that is a symbolic link is
    left alone (a warning names it), a link inside it is reported, not followed.
    """
    run_dir = _run_dir_of(trial_dir / "metrics.json")
    if is_link(trial_dir):
        log.warning("left %s alone: it is a symbolic link, not a trial folder; remove it "
                    "yourself", trial_dir)
        return
    if not trial_dir.is_dir():
        return
    keep = () if reason is not None else ("metrics.json",)
    for stray in clear_dir(run_dir, trial_dir, keep=keep):
        log.warning("left %s alone: it is a symbolic link in a trial folder; remove it yourself", stray)
    if reason is not None:
        write_json(trial_dir / "metrics.json",
                   {"trial": int(trial_dir.name), "state": "FAIL", "reason": reason}, root=run_dir)


def trial_latency(model: nn.Module, env: TrialEnv, device: torch.device) -> dict[str, Any]:
    """The model against the reference in the study's latency runtime (rankopt.compression.latency)."""
    from rankopt.compression.latency import measure_model_latency

    lat = env.config.latency
    return measure_model_latency(
        model, env.reference, env.input_shape, runtime=lat.runtime, batch=lat.batch,
        threads=lat.threads, rounds=lat.rounds, device=device,
    )


def ranks_summary(spec: Mapping[str, Mapping[str, Any]], n_targets: int) -> str:
    """``"conv1 4x8, fc svd 12 (2/3 layers)"``: each compressed layer and its ranks."""
    parts = [
        f"{name} {entry['decomposer']} {'x'.join(str(r) for r in entry['ranks'])}"
        for name, entry in spec.items()
    ]
    return f"{', '.join(parts) or 'none'} ({len(spec)}/{n_targets} layers)"


def objective_values(metrics: Mapping[str, Any], objectives: Sequence[str]) -> list[float]:
    """The values Optuna optimizes, in the study's objective order."""
    # the ratio to the reference timed in the same loop: robust to the machine's load
    key = {"latency": "latency_ratio"}
    return [float(metrics[key.get(o, o)]) for o in objectives]


def trial_context(env: TrialEnv, plan: TrialPlan, *, seed: int) -> LocalTrialContext:
    """The context a trial (or a screening candidate) of ``plan`` runs in."""
    from rankopt.training.trial import LocalTrialContext

    config = env.config
    return LocalTrialContext(
        env.reference,
        env.splits,
        input_shape=env.input_shape,
        targets=env.targets,
        decomposers=plan.decomposers,
        selector=plan.selector,
        selector_params=plan.selector_params,
        device=config.device,
        seed=seed,
        batch_size=config.data.batch_size,
        train_options=config.train,
        cache=env.cache,
        keep_faster=config.keep_faster_layers,
        rank_multiple=resolve_rank_multiple(config),
        min_in_channels=config.targets.dense_input_channels + 1,
        min_saving=config.targets.min_saving,
        latency=config.latency.model_dump(),
        latency_cache=env.run_dir / "cache" / "latency",
    )


def split_epochs(config: Any, strategy: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """``hyperparameters`` with the ``finetune`` strategy's epochs cut to
    ``multi_fidelity.first`` of them: the first rung's budget (the promoted models train
    the rest, :meth:`rankopt.config.schema.MultiFidelityConfig.continuation_epochs`)."""
    mf = config.multi_fidelity
    if mf is None or isinstance(mf, str) or mf.first is None or strategy != "finetune":
        return hyperparameters
    return {**hyperparameters, "epochs": float(hyperparameters["epochs"]) * mf.first}


def run_trial(env: TrialEnv, number: int, values: Mapping[str, Any]) -> dict[str, Any]:
    """Run trial ``number`` with the flat parameter ``values``; returns its metrics.

    Never raises for a failing trial (diverged training, a decomposition that breaks,
    a strategy bug, a plugin calling ``sys.exit()`` or raising another ``BaseException``,
    a model that does not match its spec or gives non-finite logits): the metrics then
    have ``state: "FAIL"`` and ``reason``. Only the user's Ctrl-C (see
    :func:`interrupt_guard`) passes through: the caller marks the trial interrupted.
    """
    from rankopt.contract.manager import get_registry

    start = time.perf_counter()
    trial_dir = env.trial_dir(number)
    try:
        make_dirs(env.run_dir, trial_dir)
    except UnsafePathError as exc:  # a link or file planted where the folder goes: write nothing
        log.warning("trial %d: %s", number, exc)
        return {"trial": number, "state": "FAIL", "reason": f"UnsafePathError: {exc}"}
    config = env.config
    metrics: dict[str, Any] = {"trial": number, "state": "RUNNING", "params_asked": dict(values)}
    ctx: LocalTrialContext | None = None
    try:
        metrics["node"] = socket.gethostname()
        _check_where_it_runs(env)
        plan: TrialPlan = env.space.plan(values)
        metrics.update(strategy=plan.strategy, selector=plan.selector)
        strategy = get_registry().create("strategies", plan.strategy)
        hyperparameters = split_epochs(config, plan.strategy, strategy.validate_params(plan.strategy_params))
        metrics["hyperparameters"] = hyperparameters
        ctx = trial_context(env, plan, seed=config.seed)
        metrics["selector_params"] = ctx.selector_params
        key = resolved_key(ctx, plan, strategy, hyperparameters)
        metrics["resolved_key"] = key
        # the seed follows what the trial trains, not its number: a rerun of it (resume) and
        # a repeat of its model train the same weights (no loader is built yet)
        ctx.seed = training_seed(config.seed, key, fidelity=0)
        earlier = find_repeat(env.run_dir, key, number) if config.skip_repeats else None
        if earlier is not None:
            # the Optuna pattern for repeated parameters: report the earlier trial's values
            metrics.update({k: earlier[k] for k in REPEATED if k in earlier},
                           state="COMPLETE", repeat_of=int(earlier["trial"]),
                           reference_key=env.reference_key)
            return _finish(env, trial_dir, metrics, start, ctx)
        outcome = strategy.run(ctx, hyperparameters)
        spec = normalize_spec(outcome.spec)
        model = outcome.model.to(ctx.device)
        check_outcome(env, model, spec, ctx)
        accuracy = ctx.evaluate(model)
        cost = count(model, env.input_shape, device=ctx.device)
        metrics.update(
            state="COMPLETE",
            accuracy=accuracy,
            params=cost.params,
            flops=cost.flops,
            params_compression=env.baseline["params"] / cost.params if cost.params else math.inf,
            flops_compression=env.baseline["flops"] / cost.flops if cost.flops else math.inf,
            ranks={name: entry["ranks"] for name, entry in spec.items()},
            decomposers={name: entry["decomposer"] for name, entry in spec.items()},
            ranks_summary=ranks_summary(spec, len(env.space.layer_options)),  # compressible targets
            fidelity=0,
            extra=dict(outcome.extra),
            reported=dict(ctx.reported),
            reference_key=env.reference_key,
            reference_weights=env.baseline.get("weights_sha256"),
        )
        if "latency" in config.objectives:
            metrics.update(trial_latency(model, env, ctx.device))
        save_compressed(
            trial_dir / "model.pt",
            model,
            spec,
            base=env.base,
            input_shape=env.input_shape,
            metadata={
                "study": config.name,
                "trial": number,
                "accuracy": accuracy,
                "params": cost.params,
                "flops": cost.flops,
                "strategy": plan.strategy,
            },
        )
    except BaseException as exc:  # one failing trial must not end the study
        if isinstance(exc, KeyboardInterrupt) and INTERRUPTED.is_set():
            raise  # the user's Ctrl-C: the study stops (the caller cleans up)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            INTERRUPTED.clear()  # a plugin's, not the user's
        metrics.update(
            state="FAIL",
            reason=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(limit=20),
        )
        clean_trial_dir(trial_dir)
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the next trial the memory this one held
    return _finish(env, trial_dir, metrics, start, ctx)


def _finish(env: TrialEnv, trial_dir: Path, metrics: dict[str, Any], start: float,
            ctx: LocalTrialContext | None) -> dict[str, Any]:
    """Add the timings and write the trial's ``metrics.json``."""
    seconds = time.perf_counter() - start
    train_s = ctx.train_seconds if ctx is not None else 0.0
    eval_s = ctx.eval_seconds if ctx is not None else 0.0
    metrics.update(
        seconds=seconds,
        train_seconds=train_s,
        eval_seconds=eval_s,
        overhead_seconds=max(0.0, seconds - train_s - eval_s),
        device=str(ctx.device) if ctx is not None else None,
        # epochs of training this trial ran (the compute budget fronts are compared by)
        train_epochs=sum(r.epochs for r in ctx.train_results) if ctx is not None else 0.0,
    )
    write_json(trial_dir / "metrics.json", metrics)
    if env.store is not None:
        try:
            upload = time.perf_counter()
            env.store.put_trial(int(trial_dir.name), trial_dir)
            metrics["artifact_seconds"] = time.perf_counter() - upload
        except OSError as exc:  # a trial whose model stays on this node is lost to the study
            metrics.update(state="FAIL", reason=(
                f"artifacts: cannot upload the trial folder to {env.store.describe()!r} from "
                f"node {socket.gethostname()} ({type(exc).__name__}: {exc})"))
            clean_trial_dir(trial_dir)
            write_json(trial_dir / "metrics.json", metrics)
    return metrics


def check_outcome(env: TrialEnv, model: nn.Module, spec: Mapping[str, Any], ctx: Any) -> None:
    """Refuse a strategy's outcome that would be a wrong front point: a model whose tensors
    do not match ``compress(reference, spec)`` (its file could not be loaded), or whose
    logits on a validation batch are not finite."""
    import copy

    from rankopt.compression.surgery import compress

    # a structural copy of the reference on the meta device: no weights are copied
    memo: dict[int, Any] = {}
    for tensor in list(env.reference.parameters()) + list(env.reference.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    with torch.device("meta"):
        skeleton = compress(copy.deepcopy(env.reference, memo), spec, initialize=False)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            raise ValueError(
                f"the strategy returned a model that does not match its spec: {key!r} has shape "
                f"{got.get(key)} in the model, {expected.get(key)} in compress(reference, spec)"
            )
    _, loader = ctx._loaders()
    inputs = next(iter(loader))[0].to(ctx.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(inputs)
    finally:
        model.train(was_training)
    if not torch.isfinite(logits).all():
        raise ArithmeticError(
            "the compressed model gives non-finite logits (inf/NaN) on a validation batch; "
            "it is not a usable model"
        )


def _check_where_it_runs(env: TrialEnv) -> None:
    """Before any work: the GPUs this trial was given are usable, and the reference it
    compresses is the study's (the content hash in the reference metrics)."""
    from rankopt.search.reference import fingerprint_module

    gpus = env.config.resources.gpus
    if gpus > 0 and env.config.backend == "ray" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"resources.gpus: this trial was given {gpus:g} GPU(s) on node "
            f"{socket.gethostname()} (CUDA_VISIBLE_DEVICES={visible!r}), but torch cannot "
            f"use them (torch {torch.__version__}, CUDA build {torch.version.cuda}); install "
            "a CUDA build of torch on the workers or fix the node's driver"
        )
    expected = env.baseline.get("weights_sha256")
    if expected is not None and fingerprint_module(env.reference) != expected:
        raise RuntimeError(
            f"the reference weights here do not match the study's (sha256 {expected[:12]}); "
            "the reference was changed or corrupted in transit: rerun to fetch it again"
        )


# Optuna 5 tells samplers the constraints per trial (constraints_func is deprecated there)
SET_CONSTRAINT = hasattr(optuna.trial.Trial, "set_constraint")


def set_constraints(trial: optuna.trial.Trial, config: StudyConfig, metrics: Mapping[str, Any]) -> None:
    """Record ``value - limit`` (<= 0 is feasible) of the study's limits on a completed trial,
    so the sampler and ``best_trials`` know which trials are feasible."""
    if not SET_CONSTRAINT or metrics.get("state") != "COMPLETE":
        return
    for key, limit in (("params", config.constraints.max_params), ("flops", config.constraints.max_flops)):
        if limit is not None:
            trial.set_constraint(f"max_{key}", float(metrics[key]) - float(limit))


def user_attrs(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a trial's metrics stored as Optuna user attrs (JSON-safe)."""
    return {k: json.loads(json.dumps(metrics[k], default=jsonable)) for k in TRIAL_ATTRS if k in metrics}
