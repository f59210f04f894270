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
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn as nn
from optuna.trial import TrialState

from rankopt.config import StudyConfig, config_to_yaml, import_model_factory, load_config
from rankopt.errors import ConfigError, RankoptError, StudyInterrupted
from rankopt.plugins.datasets.base import DatasetSplits
from rankopt.results import STUDY_FILE, StudyResult
from rankopt.search.local import quiet_optuna
from rankopt.search.objective import TrialEnv, clean_trial_dir, interrupt_guard, write_json
from rankopt.search.reference import check_reference_key, obtain_reference, reference_key
from rankopt.search.storage import STALE_REASON
from rankopt.search.sampler import ConstraintsFunc, create_study, make_sampler
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
        if overrides.get("run_dir") is not None and not str(overrides["run_dir"]).strip():
            raise ConfigError(
                f"--run-dir: {overrides['run_dir']!r} is not a directory path; give a folder "
                "such as runs/my-study, or leave it out for runs/<name>"
            )
        self.config = load_config(config, **overrides)
        if model is None and self.config.model is None:
            raise ConfigError("model: required (a registered name or 'package.module:callable'), "
                              "unless a model is passed to Study(..., model=...)")
        if data is None and self.config.data.name is None:
            raise ConfigError("data.name: required (a registered dataset), unless data is "
                              "passed to Study(..., data=DatasetSplits(...))")
        check_run_dir(self.config.resolved_run_dir())
        if isinstance(config, (str, os.PathLike)):
            record = self.config.resolved_run_dir() / STUDY_FILE
            if Path(config).resolve() == record.resolve():
                raise ConfigError(
                    f"study file {str(config)!r} is the run directory's own record of the "
                    f"resolved config ({STUDY_FILE}), which every run rewrites; copy it out of "
                    "the run directory and run the copy"
                )
        self.user_model = model
        self.user_data = data
        self.progress = progress
        # (number, reason) of the trials that failed in the last run() (CLI exit status)
        self.failed_trials: list[tuple[int, str]] = []

    @property
    def run_dir(self) -> Path:
        return self.config.resolved_run_dir()

    # -- preparation (no side effects on disk) ------------------------------------------
    def _prepare(self) -> _Prepared:
        from rankopt.manager import get_registry

        config = self.config
        if config.backend != "ray" or config.reference.on == "driver":
            # with backend ray the device is resolved where each trial runs (connect()
            # checks the cluster has GPUs for device: cuda)
            _resolve_driver_device(config)
        _check_backend(config)
        if self.user_data is not None:
            splits = self.user_data
        else:
            assert config.data.name is not None
            splits = get_registry().create("datasets", config.data.name, **config.data.kwargs)
        from rankopt.evaluation import hold_out_test

        splits = hold_out_test(splits, config.data.test_fraction, config.seed)
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
        from rankopt.search.upfront import check_model_on_data, check_reference_weights

        check_model_on_data(model, splits, config.data.batch_size,
                            given="model" if self.user_model is not None else "model.name")
        check_reference_weights(config, model)
        targets = find_layers(
            model, input_shape, include=config.targets.include, exclude=config.targets.exclude
        )
        thin = config.targets.dense_input_channels
        targets = [t for t in targets if not _thin_conv(model, t.name, thin)]
        if not targets:
            names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
            raise ConfigError(
                f"targets: include {config.targets.include} / exclude {config.targets.exclude} "
                f"match no Conv2d or Linear layer (convs with <= {thin} input channels stay "
                f"dense: targets.dense_input_channels); the model's layers are {names}"
            )
        _check_against_model(config, model, targets)
        space = SearchSpace(config, model, targets)
        enqueue = [space.check_point(p, f"enqueue[{i}]") for i, p in enumerate(config.enqueue)]
        if config.seed_proposals is not False:
            from rankopt.search.seeding import DEFAULT_PROPOSALS, proposal_points, uniform_proposals

            k = DEFAULT_PROPOSALS if config.seed_proposals is True else int(config.seed_proposals)
            points = proposal_points(space, k) + uniform_proposals(space, model)
            enqueue += [p for p in points if p not in enqueue]
        run_dir = self.run_dir
        storage_url = config.storage or ""
        return _Prepared(config, run_dir, splits, model, base, input_shape, targets, space,
                         storage_url, enqueue, make_sampler(config))

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> StudyResult:
        """Run the missing trials and return the results (see :class:`StudyResult`)."""
        from rankopt.search.storage import open_storage

        from rankopt.search.rundir import check_existing_run_dir

        prep = self._prepare()
        config = prep.config
        key = reference_key(config, prep.base, prep.input_shape, self.user_model, self.user_data)
        check_existing_run_dir(config, prep.run_dir, key, user_model=self.user_model is not None)
        storage = open_storage(prep.storage_url) if prep.storage_url else None
        started_ray = False
        if config.backend == "ray":
            from rankopt.search.ray_backend import connect

            started_ray = connect(config)
        try:
            with interrupt_guard():
                return self._run(prep, storage)
        except KeyboardInterrupt:
            raise StudyInterrupted(_interrupted_message(prep)) from None
        finally:
            if started_ray:
                import ray

                ray.shutdown()

    def _run(self, prep: _Prepared, storage: Any) -> StudyResult:
        from rankopt.search.progress import StudyProgress
        from rankopt.search.storage import (
            RunLock,
            TrialClaim,
            default_storage_url,
            fail_stale_trials,
            is_local_sqlite,
            open_storage,
        )

        config = prep.config
        run_dir = prep.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        # the setup (storage, stale trials, reference) is one process at a time; trials are
        # not: other processes may run this study at the same time (see RunLock)
        setup = RunLock(run_dir)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch_threads(config.resources.cpus))
            stack.enter_context(setup)
            (run_dir / STUDY_FILE).write_text(
                "# the resolved study config, as run (storage: null is optuna.db here)\n"
                + config_to_yaml(config)
            )
            if storage is None:
                storage = open_storage(default_storage_url(run_dir))
            with quiet_optuna():
                study = create_study(config, storage, prep.sampler)
            _reseed_later_sessions(study, config)
            url = config.storage or default_storage_url(run_dir)
            with TrialClaim(run_dir):  # no other worker is between asking and naming a trial
                stale = fail_stale_trials(study, storage, local=is_local_sqlite(url))
            if stale:
                log.warning("marked trials %s FAIL: a process that died left them running", stale)
                for number in stale:
                    clean_trial_dir(run_dir / "trials" / str(number), reason=STALE_REASON)
            from rankopt.search.rundir import reconcile_trial_dirs

            with TrialClaim(run_dir):  # the storage is the truth about interrupted trials
                fixed = reconcile_trial_dirs(study, run_dir)
            if fixed:
                log.warning("trials %s: their folders disagreed with the storage; now FAIL", fixed)
            key = reference_key(config, prep.base, prep.input_shape, self.user_model, self.user_data)
            check_reference_key(study, key, run_dir)
            store = None
            if config.artifacts is not None:
                from rankopt.search.artifact_store import ArtifactStore

                store = ArtifactStore(config.artifacts, config.name)
            show = StudyProgress(None, enabled=self.progress, baseline={})
            show.message(f"study {config.name!r}: reference model ({_describe_reference(config)})")
            reference, baseline = obtain_reference(
                config,
                model=prep.model,
                splits=prep.splits,
                input_shape=prep.input_shape,
                base=prep.base,
                targets=prep.targets,
                key=key,
                run_dir=run_dir,
                report=show.message if show.enabled else None,
                store=store,
            )
            check_reference_key(study, key, run_dir, baseline.get("weights_sha256"))
            _warn_weak_reference(baseline, prep.splits.num_classes)
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
                store=store,
            )
            if not study.trials:
                enqueue = list(prep.enqueue)
                if config.screening is not None:
                    enqueue += [p for p in _screen(env, show) if p not in enqueue]
                for point in enqueue:
                    study.enqueue_trial(point, skip_if_exists=True)
            done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            missing = None if config.trials is None else max(0, config.trials - done)
            setup.release()
            outcomes: list[str] = []

            def on_trial_done(number: int, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
                outcomes.append(str(metrics.get("state")))
                if metrics.get("state") != "COMPLETE":
                    self.failed_trials.append((number, str(metrics.get("reason", "?"))))
                progress.trial_done(number, values, metrics)
                _call_trial_hook(run_dir, number, values, metrics)

            def too_many_failures() -> bool:
                limit = config.max_failures
                return limit is not None and outcomes.count("FAIL") >= limit

            show.message(
                f"reference accuracy {baseline['accuracy']:.4f}, {baseline['params']:,} params, "
                f"{baseline['flops']:,} FLOPs; {done} trials done, running "
                f"{'trials until the timeout' if missing is None else missing} on the "
                f"{config.backend} backend; results in {run_dir}"
            )
            earlier = [
                (float(t.user_attrs["accuracy"]), float(t.user_attrs["params"]))
                for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if "accuracy" in t.user_attrs and "params" in t.user_attrs
            ]
            with StudyProgress(missing, enabled=self.progress, baseline=baseline,
                               earlier=earlier) as progress:
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
                        target=config.trials,
                        should_stop=too_many_failures,
                    )
                else:
                    from rankopt.search.ray_backend import run_ray

                    run_ray(env, study, storage, n_trials=missing, on_trial_done=on_trial_done,
                            should_stop=too_many_failures, target=config.trials)
                if config.multi_fidelity is not None and not too_many_failures():
                    from rankopt.search.fidelity import run_promotions

                    progress.message(f"training the models near the front further "
                                     f"({config.multi_fidelity.epochs:g} epochs each)")
                    run_promotions(env, study, on_trial_done)
            result = StudyResult(run_dir, config)
            summary = result.status()
            write_json(run_dir / "summary.json", summary)
            _call_study_hook(run_dir, summary)
        if config.max_failures is not None and outcomes.count("FAIL") >= config.max_failures:
            reasons = [
                t.user_attrs.get("reason", "?")
                for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            ]
            raise RankoptError(
                f"study {config.name!r} stopped: {outcomes.count('FAIL')} of its "
                f"{len(outcomes)} trials in this run failed (max_failures: "
                f"{config.max_failures}); the last reason: {reasons[-1] if reasons else '?'}. "
                f"Completed trials are kept; fix the cause and rerun to continue (see "
                f"{run_dir}/trials/*/metrics.json)"
            )
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


def _interrupted_message(prep: _Prepared) -> str:
    done = "?"
    with contextlib.suppress(Exception):  # the storage may be what was interrupted
        from rankopt.results import storage_url_of
        from rankopt.search.storage import open_storage

        url = storage_url_of(prep.config, prep.run_dir)
        try:
            study = optuna.load_study(study_name=prep.config.name, storage=open_storage(url))
            done = str(len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
        except KeyError:  # interrupted before the study was created
            done = "0"
    return f"Interrupted: {done} trials complete; rerun the same command to continue"


def _screen(env: Any, show: Any) -> list[dict[str, Any]]:
    """Run the study's screening (the no-fine-tune proxy) and return the points it keeps."""
    from rankopt.search.screening import screen

    screening = env.config.screening
    show.message(
        f"screening {screening.candidates} rank choices without training (keeping "
        f"{screening.keep} to start the search)"
    )
    step = max(1, screening.candidates // 10)

    def tick(candidate: Any) -> None:
        if (candidate.number + 1) % step == 0:
            show.message(f"  screened {candidate.number + 1}/{screening.candidates}")

    result = screen(env, screening.candidates, screening.keep, on_candidate=tick)
    failed = sum(c.accuracy is None for c in result.candidates)
    show.message(
        f"screening done in {result.seconds:.0f} s: {len(result.kept)} points kept"
        + (f", {failed} candidates failed" if failed else "")
        + f" (see {env.run_dir / 'screening.json'})"
    )
    return result.kept



def _warn_weak_reference(baseline: Mapping[str, Any], num_classes: int) -> None:
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


SESSIONS_ATTR = "rankopt_sessions"


def _reseed_later_sessions(study: optuna.Study, config: StudyConfig) -> None:
    """Give every later session on a study (a rerun, or a second worker) its own sampler
    seed, ``sampler.seed + k`` for the k-th: with one seed, two workers (or a rerun) would
    propose the same random points again. The first session keeps the seed as given, so
    a study file and seed still give the same trials."""
    k = int(study.user_attrs.get(SESSIONS_ATTR, 0))
    study.set_user_attr(SESSIONS_ATTR, k + 1)
    if k and config.sampler.seed is not None:
        sampler = config.sampler.model_copy(update={"seed": config.sampler.seed + k})
        study.sampler = make_sampler(config.model_copy(update={"sampler": sampler}))


def _thin_conv(model: nn.Module, name: str, max_channels: int) -> bool:
    """A conv with at most ``max_channels`` input channels (kept dense by default)."""
    module = model.get_submodule(name)
    return isinstance(module, nn.Conv2d) and module.in_channels <= max_channels


def _check_against_model(config: StudyConfig, model: nn.Module, targets: list[LayerInfo]) -> None:
    """Settings that only the built model can refute: explicit ranks above a layer's largest,
    and a params limit below what no decomposition of the targets can remove."""
    import fnmatch

    from rankopt.manager import get_registry

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


def check_run_dir(run_dir: Path) -> None:
    """A run directory must be a directory, or creatable, and writable (checked before any
    work, so that a typo in ``--run-dir`` fails at once and creates nothing)."""
    run_dir = Path(run_dir)
    probe = run_dir
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is" if probe == run_dir else f"lies under {str(probe)!r}, which is"
        raise ConfigError(
            f"run directory {str(run_dir)!r} {what} a file, not a directory; give another "
            "--run-dir (or run_dir in the study file)"
        )
    # root passes os.access on a read-only file system's folders: ask the mount itself
    read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
    if read_only:
        raise ConfigError(
            f"run directory {str(run_dir)!r} is on a read-only file system ({str(probe)!r}); "
            "give a --run-dir on a writable one"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run directory {str(run_dir)!r} is not writable ({str(probe)!r} does not let this "
            f"user create files); give a writable --run-dir"
        )


def _describe_reference(config: StudyConfig) -> str:
    ref = config.reference
    if ref.weights:
        return f"loading {ref.weights}"
    if ref.epochs == 0:
        return "the model as given"
    return f"training {ref.epochs:g} epochs, or the cached one"


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


def _resolve_driver_device(config: StudyConfig) -> None:
    from rankopt.devices import resolve_device

    try:
        resolve_device(config.device)
    except ConfigError as exc:
        if config.backend != "ray":
            raise
        raise ConfigError(
            f"{exc}; with backend ray, reference: {{on: cluster}} trains the reference on a "
            "worker, so this machine needs no GPU"
        ) from None


def _check_backend(config: StudyConfig) -> None:
    """Ray installed when asked for; GPUs per trial that this machine has (a Ray cluster
    named by an address is checked once connected, see ``ray_backend.connect``)."""
    address = config.address or os.environ.get("RAY_ADDRESS")
    if config.backend == "ray":
        try:
            import ray.tune.search.optuna  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"backend: 'ray' needs ray[tune] installed ({exc}); pip install 'ray[tune]'"
            ) from None
    gpus = config.resources.gpus
    remote = config.backend == "ray" and bool(address)
    if gpus > 0 and not remote and torch.cuda.device_count() < math.ceil(gpus):
        raise ConfigError(
            f"resources.gpus: {gpus:g} GPU(s) per trial requested, but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); set resources.gpus: 0, or run on a "
            "GPU machine" + (" or Ray cluster (--address)" if config.backend == "ray" else "")
        )


def _build_model(config: StudyConfig, splits: DatasetSplits) -> tuple[nn.Module, dict[str, Any]]:
    from rankopt.manager import get_registry

    assert config.model is not None
    name, kwargs = config.model.name, dict(config.model.kwargs)
    if ":" in name:
        factory = import_model_factory(name, "model.name")
    else:
        factory = get_registry().record("models", name).factory
    from rankopt.config import _signature_names

    accepts = _signature_names(factory)
    for key, value in (("num_classes", splits.num_classes), ("in_channels", splits.input_shape[0])):
        if key not in kwargs and (accepts is None or key in accepts):
            kwargs[key] = int(value)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: {name!r} returned {type(model).__name__}, not an nn.Module")
    base = {"callable": name, "kwargs": kwargs} if ":" in name else {"model": name, "kwargs": kwargs}
    return model, base


def _call_trial_hook(run_dir: Path, number: int, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
    from rankopt.manager import get_registry

    hook_metrics = {k: v for k, v in metrics.items() if k not in ("traceback",)}
    get_registry().pm.hook.rankopt_trial_finished(
        run_dir=run_dir, trial_number=number, params=dict(values), metrics=hook_metrics
    )


def _call_study_hook(run_dir: Path, summary: Mapping[str, Any]) -> None:
    from rankopt.manager import get_registry

    get_registry().pm.hook.rankopt_study_finished(run_dir=run_dir, summary=dict(summary))
