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
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch.nn as nn
from optuna.trial import TrialState

from rankopt.config.schema import StudyConfig, config_to_yaml, load_config
from rankopt.contract.dataset import DatasetSplits
from rankopt.results.reading import STUDY_FILE, StudyResult
from rankopt.core.errors import ConfigError, DiskFullError, StudyInterrupted
from rankopt.search.building import build_model, find_targets
from rankopt.search.finish import call_study_hook, call_trial_hook, check_failures, interrupted_message
from rankopt.search.local import quiet_optuna, torch_threads
from rankopt.core.safe_paths import atomic_write_text, disk_full_error, disk_full_in
from rankopt.search.objective import TrialEnv, clean_trial_dir, interrupt_guard, write_json
from rankopt.search.reference import (
    check_reference_key,
    describe_reference,
    obtain_reference,
    reference_key,
    warn_weak_reference,
)
from rankopt.search.rundir import check_run_dir
from rankopt.search.sampler import ConstraintsFunc, create_study, make_sampler, reseed_later_sessions
from rankopt.search.refining import refine_sampler
from rankopt.search.space import SearchSpace
from rankopt.search.storage import STALE_REASON
from rankopt.search.upfront import (
    check_against_model,
    check_backend,
    check_model_on_data,
    check_reference_weights,
    resolve_driver_device,
)
from rankopt.compression.surgery import LayerInfo

__all__ = [
    "Study",
    "StudyResult",
    "run_study",
    "make_sampler",
    "ConstraintsFunc",
    # the helpers moved to rankopt.search modules; still importable from here
    "check_run_dir",
    "torch_threads",
]


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


def run_dir_full(run_dir: Path, storage: str | None) -> DiskFullError:
    """The one-line error for a run that filled its disk: the storage file (or the run
    directory), the free space there and about what the next trial needs (its model file,
    the size of the reference's, and its records). SQLite rolled the failed write back,
    so the storage is consistent; the trial left RUNNING is failed on the next run."""
    where = run_dir / "optuna.db"
    if storage and storage.startswith("sqlite:///"):
        where = Path(storage[len("sqlite:///"):])
    elif storage:
        where = run_dir / "trials"
    try:
        needed = (run_dir / "reference" / "model.pt").stat().st_size + (1 << 16)
    except OSError:
        needed = 1 << 20
    return disk_full_error(where, needed)


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
        from rankopt.contract.manager import get_registry

        config = self.config
        if config.backend != "ray" or config.reference.on == "driver":
            # with backend ray the device is resolved where each trial runs (connect()
            # checks the cluster has GPUs for device: cuda)
            resolve_driver_device(config)
        check_backend(config)
        if self.user_data is not None:
            splits = self.user_data
        else:
            assert config.data.name is not None
            splits = get_registry().create("datasets", config.data.name, **config.data.kwargs)
        from rankopt.results.evaluation import hold_out_test

        splits = hold_out_test(splits, config.data.test_fraction, config.seed)
        input_shape = (1, *tuple(int(d) for d in splits.input_shape))
        from rankopt.training.loop import seed_everything

        seed_everything(config.seed)  # the reference's initial weights follow the study seed
        if self.user_model is not None:
            import copy

            model = copy.deepcopy(self.user_model).cpu()
            base = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
        else:
            assert config.model is not None
            model, base = build_model(config, splits)
        check_model_on_data(model, splits, config.data.batch_size,
                            given="model" if self.user_model is not None else "model.name")
        check_reference_weights(config, model)
        from rankopt.compression.attention import modularize_attention

        modularize_attention(model)  # attention calls its projections as modules (same state_dict)
        targets = find_targets(config, model, input_shape)
        check_against_model(config, model, targets)
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
        from rankopt.search.rundir import check_existing_run_dir
        from rankopt.search.storage import open_storage

        if self.config.backend == "ray":  # a wrong address fails before the data is loaded
            from rankopt.search.ray_checks import probe_configured_address

            probe_configured_address(self.config.address)
        prep = self._prepare()
        config = prep.config
        key = reference_key(config, prep.base, prep.input_shape, self.user_model, self.user_data)
        check_existing_run_dir(config, prep.run_dir, key, user_model=self.user_model is not None)
        if config.artifacts is not None:  # probed before the run directory exists
            from rankopt.search.artifact_store import ArtifactStore

            ArtifactStore(config.artifacts, config.name).probe()
        storage = open_storage(prep.storage_url) if prep.storage_url else None
        started_ray = False
        if config.backend == "ray":
            from rankopt.search.ray_backend import connect

            started_ray = connect(config)
        try:
            with interrupt_guard():
                return self._run(prep, storage)
        except KeyboardInterrupt:
            raise StudyInterrupted(interrupted_message(prep.config, prep.run_dir)) from None
        except DiskFullError:
            raise
        except Exception as exc:
            # a full disk surfaces as SQLite's error wrapped by SQLAlchemy and Optuna (ending
            # in "Should not reach."): one line naming where, and the free space there
            if disk_full_in(exc):
                raise run_dir_full(prep.run_dir, config.storage) from None
            raise
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
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # /proc/x, a read-only or vanished parent: the first write
            raise ConfigError(
                f"run directory {str(run_dir)!r} cannot be created ({exc.strerror or exc}); give "
                "a --run-dir on a writable file system (nothing was written)"
            ) from None
        # the setup (storage, stale trials, reference) is one process at a time; trials are
        # not: other processes may run this study at the same time (see RunLock)
        setup = RunLock(run_dir)
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch_threads(config.resources.cpus))
            stack.enter_context(setup)
            atomic_write_text(
                run_dir / STUDY_FILE,
                "# the resolved study config, as run (storage: null is optuna.db here)\n"
                + config_to_yaml(config),
                root=run_dir,
            )
            if storage is None:
                storage = open_storage(default_storage_url(run_dir))
            with quiet_optuna():
                study = create_study(config, storage, prep.sampler)
            reseed_later_sessions(study, config)
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
            from rankopt.search.resume import dead_streak, requeue_lost_trials

            with TrialClaim(run_dir):  # interrupted or dead trials run again, with their parameters
                requeued = requeue_lost_trials(study, config.trials)
            if requeued:
                log.warning("trials %s were interrupted or died: enqueued again with their "
                            "parameters", requeued)
            dead = dead_streak(study)  # trials found dead count towards max_failures
            key = reference_key(config, prep.base, prep.input_shape, self.user_model, self.user_data)
            check_reference_key(study, key, run_dir)
            store = None
            if config.artifacts is not None:
                from rankopt.search.artifact_store import ArtifactStore

                store = ArtifactStore(config.artifacts, config.name)
            show = StudyProgress(None, enabled=self.progress, baseline={})
            show.message(f"study {config.name!r}: reference model ({describe_reference(config)})")
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
            warn_weak_reference(baseline, prep.splits.num_classes)
            from rankopt.search.reference_statistics import calibrate_reference

            calibrate_reference(reference, config, prep.splits, prep.targets, run_dir, key)
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
            refine_sampler(study, env)
            if not study.trials:
                enqueue = list(prep.enqueue)
                if config.seed_proposals is not False:  # the VBMF sweep needs the trained reference
                    from rankopt.search.seeding import anchored_proposals

                    enqueue += [p for p in anchored_proposals(
                        prep.space, reference, prep.targets, cache=env.cache,
                        min_in_channels=config.targets.dense_input_channels + 1,
                        min_saving=config.targets.min_saving) if p not in enqueue]
                full = config.trials is not None and len(enqueue) >= config.trials
                if config.screening is not None and full:  # its points would all be cut below
                    log.warning("screening skipped: the enqueued points and proposals already "
                                "fill the %d trials", config.trials)
                elif config.screening is not None:
                    from rankopt.search.screening import screen_study

                    enqueue += [p for p in screen_study(env, show) if p not in enqueue]
                if config.trials is not None:
                    # proposals and screened points beyond the trial budget would stay
                    # WAITING in the storage forever; the user's own enqueue is kept whole
                    enqueue = enqueue[: max(len(config.enqueue), config.trials)]
                for point in enqueue:
                    study.enqueue_trial(point, skip_if_exists=True)
            # multi_fidelity's continuations are trials of the storage, not of the search's
            # count: `trials: 24` is 24 searched models however many were continued
            live = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
            continued = sum(1 for t in live if t.user_attrs.get("continued_from") is not None)
            done = sum(1 for t in live
                       if t.state == TrialState.COMPLETE and t.user_attrs.get("continued_from") is None)
            missing = None if config.trials is None else max(0, config.trials - done)
            target = None if config.trials is None else config.trials + continued
            setup.release()
            outcomes: list[str] = []

            def on_trial_done(number: int, values: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
                outcomes.append(str(metrics.get("state")))
                if metrics.get("state") != "COMPLETE":
                    self.failed_trials.append((number, str(metrics.get("reason", "?"))))
                progress.trial_done(number, values, metrics)
                call_trial_hook(run_dir, number, values, metrics)

            def too_many_failures() -> bool:
                limit = config.max_failures
                return limit is not None and outcomes.count("FAIL") + dead >= limit

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
                               earlier=earlier) as progress, _no_phantom(study, run_dir):
                def search(n_trials: int | None) -> None:
                    if config.backend == "local":
                        from rankopt.search.local import run_local

                        run_local(
                            env,
                            study,
                            n_trials=n_trials,
                            timeout=config.timeout,
                            n_jobs=config.max_concurrent,
                            on_trial_done=on_trial_done,
                            target=target,
                            should_stop=too_many_failures,
                        )
                    else:
                        from rankopt.search.ray_backend import run_ray

                        run_ray(env, study, storage, n_trials=n_trials,
                                on_trial_done=on_trial_done, should_stop=too_many_failures,
                                target=target)

                if missing == 0:
                    progress.message(f"study {config.name!r}: all {config.trials} trials are done")
                else:
                    search(missing)
                if config.trials is not None:
                    # never end short while other workers hold trials: wait for them (dead
                    # ones' trials fail as their leases expire), then run what is missing
                    from rankopt.search.owed import wait_for_owed
                    from rankopt.search.storage import worker_id

                    while not too_many_failures() and wait_for_owed(
                            study, url, worker_id(), progress.message):
                        searched = sum(1 for t in study.get_trials(
                            deepcopy=False, states=(TrialState.COMPLETE,))
                            if t.user_attrs.get("continued_from") is None)
                        if searched >= config.trials:
                            break
                        search(config.trials - searched)
                if config.multi_fidelity is not None and not too_many_failures():
                    from rankopt.search.fidelity import run_promotions

                    mf = config.multi_fidelity
                    assert not isinstance(mf, str)
                    more = ("the rest of their epochs" if mf.split
                            else f"{mf.continuation_epochs(0.0):g} epochs each")
                    progress.message(f"training the models near the front further ({more})")
                    run_promotions(env, study, on_trial_done)
            result = StudyResult(run_dir, config)
            summary = result.status()
            write_json(run_dir / "summary.json", summary)
            call_study_hook(run_dir, summary)
        check_failures(study, config, outcomes, run_dir, dead=dead)
        return result


@contextlib.contextmanager
def _no_phantom(study: optuna.Study, run_dir: Path) -> Any:
    """On Ctrl-C or SIGTERM, no trial of this process stays RUNNING (see fail_own_running)."""
    try:
        yield
    except KeyboardInterrupt:
        from rankopt.search.resume import fail_own_running

        fail_own_running(study, run_dir)
        raise
