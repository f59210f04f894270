"""Reading a run directory: trials, the Pareto front, hypervolume, status, and picking a model.

A run directory is self-describing: ``resolved-study.yaml`` (the resolved config, which names
the storage), ``reference/metrics.json`` (the baseline) and ``trials/<n>/`` are all
:class:`StudyResult` needs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch.nn as nn
import yaml
from optuna.trial import FrozenTrial, TrialState

from rankopt.config.schema import StudyConfig, load_config
from rankopt.core.errors import ArtifactError, ConfigError
from rankopt.search.front import hypervolume_2d, pareto_front_2d
from rankopt.search.layout import LEGACY_STUDY_FILE, STUDY_FILE, reference_path, storage_url_of

__all__ = [
    "TrialRecord",
    "StudyResult",
    "pareto_front_2d",
    "hypervolume_2d",
    "hypervolume_history",
    "reference_path",
    "storage_url_of",
]



@dataclass(frozen=True)
class TrialRecord:
    """One completed trial as the front and ``rankopt pareto`` show it."""

    trial: int
    accuracy: float
    params: int
    flops: int
    params_compression: float
    flops_compression: float
    strategy: str
    selector: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    selector_params: dict[str, Any] = field(default_factory=dict)
    ranks_summary: str = ""
    spec: dict[str, Any] = field(default_factory=dict)  # {layer: {"decomposer", "ranks"}}
    latency_ms: float | None = None
    model_path: str = ""
    latency_ratio: float | None = None  # latency / the reference's, timed in the same loop
    # the values the sampler chose for this trial's selector and strategy ("energy.p": 0.8)
    searched: dict[str, Any] = field(default_factory=dict)
    fidelity: int = 0  # promotions this model had (multi_fidelity); 0 = the first budget
    train_epochs: float = 0.0  # training epochs it received in all
    repeat_of: int | None = None  # a repeat reports this earlier trial's model and values
    continued_from: int | None = None  # the trial whose model this one trained further

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _best(study: optuna.Study, trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Optuna's Pareto-optimal trials (feasible ones first, as ``study.best_trials``) among
    ``trials``."""
    # Optuna's own routine behind best_trials, on a subset of the trials (private, but
    # best_trials itself has no way to leave repeats and superseded trials out)
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials
    from optuna.study.study import _is_constrained_optimization

    constrained = _is_constrained_optimization(study.get_trials(deepcopy=False))
    return _get_pareto_front_trials_by_trials(trials, study.directions, consider_constraint=constrained)


# -- 2-D fronts and hypervolume ----------------------------------------------------------------


def hypervolume_history(
    records: Sequence[TrialRecord], baseline: dict[str, Any], measure: str
) -> list[tuple[int, float]]:
    """``(trial number, hypervolume of the trials up to it)`` for ``measure`` params or flops."""
    out, seen = [], []
    for rec in sorted(records, key=lambda r: r.trial):
        seen.append((rec.accuracy, float(getattr(rec, measure))))
        out.append((rec.trial, hypervolume_2d(seen, float(baseline[measure]))))
    return out


def compressed(record: TrialRecord) -> bool:
    """Whether a trial compressed at least one layer to fewer parameters (not 1.0x)."""
    return bool(record.spec) and not record.params_compression <= 1.0


# -- the result of a study --------------------------------------------------------------------


def _recorded_config(study_file: Path) -> StudyConfig:
    """The run's record of its config; a damaged record is one :class:`ConfigError` line
    naming the file (never a YAML parser's traceback)."""
    where = f"run directory {str(study_file.parent)!r}: its record {study_file.name}"
    try:
        raw = yaml.safe_load(study_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{where} cannot be read ({type(exc).__name__}{at}); it was damaged or replaced: "
            "restore it from the study file you ran (rankopt writes it on every run)"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where} holds a {type(raw).__name__}, not a study config; it was damaged or "
            "replaced: restore it from the study file you ran"
        )
    try:
        return load_config(raw, check_plugins=False)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


class StudyResult:
    """The results in a run directory (what ``rankopt.run_study`` returns).

    >>> result = rankopt.run_study("studies/quickstart.yaml")
    >>> [(r.trial, r.accuracy, r.params) for r in result.front()]
    """

    def __init__(self, run_dir: str | Path, config: StudyConfig | None = None) -> None:
        self.run_dir = Path(run_dir)
        study_file = self.run_dir / STUDY_FILE
        if not study_file.is_file() and (self.run_dir / LEGACY_STUDY_FILE).is_file():
            study_file = self.run_dir / LEGACY_STUDY_FILE
        if config is None:
            if not study_file.is_file():
                raise ConfigError(
                    f"{str(self.run_dir)!r} is not a rankopt run directory (no {STUDY_FILE}); "
                    "give the directory `rankopt run` wrote, e.g. runs/quickstart"
                )
            config = _recorded_config(study_file)
        self.config = config
        self._study: optuna.Study | None = None

    # -- sources ---------------------------------------------------------------------------
    @property
    def study(self) -> optuna.Study:
        """The Optuna study in the run's storage."""
        if self._study is None:
            from rankopt.search.storage import open_storage

            storage = open_storage(storage_url_of(self.config, self.run_dir))
            try:
                self._study = optuna.load_study(study_name=self.config.name, storage=storage)
            except KeyError:
                raise ConfigError(
                    f"the storage of {str(self.run_dir)!r} holds no study named "
                    f"{self.config.name!r}; has `rankopt run` started it?"
                ) from None
        return self._study

    @property
    def reference(self) -> dict[str, Any]:
        """The baseline: ``accuracy``, ``params``, ``flops`` (and how it was obtained)."""
        path = reference_path(self.run_dir)
        if not path.is_file():
            raise ArtifactError(
                f"{str(path)!r} is missing: the study in {str(self.run_dir)!r} has not finished "
                "training its reference model"
            )
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    # -- trials ----------------------------------------------------------------------------
    def _record(self, trial: FrozenTrial) -> TrialRecord:
        attrs = trial.user_attrs
        decomposers = attrs.get("decomposers", {})
        ranks = attrs.get("ranks", {})
        hyperparameters = dict(attrs.get("hyperparameters", {}))
        train_epochs = float(attrs.get("train_epochs", 0.0))
        if attrs.get("continued_from") is not None and isinstance(hyperparameters.get("epochs"), (int, float)):
            # a continuation carries its source's values: report the epochs this trial
            # trained (train_epochs), not the source's "epochs: 2.0"
            hyperparameters["epochs"] = round(train_epochs, 3)
        return TrialRecord(
            trial=trial.number,
            accuracy=float(attrs["accuracy"]),
            params=int(attrs["params"]),
            flops=int(attrs["flops"]),
            params_compression=float(attrs.get("params_compression", math.nan)),
            flops_compression=float(attrs.get("flops_compression", math.nan)),
            strategy=str(attrs.get("strategy", "")),
            selector=str(attrs.get("selector", "")),
            hyperparameters=hyperparameters,
            selector_params=dict(attrs.get("selector_params", {})),
            ranks_summary=str(attrs.get("ranks_summary", "")),
            spec={
                name: {"decomposer": decomposers.get(name, ""), "ranks": list(r)}
                for name, r in ranks.items()
            },
            latency_ms=attrs.get("latency_ms"),
            latency_ratio=attrs.get("latency_ratio"),
            model_path=str(self.run_dir / "trials" / str(attrs.get("repeat_of", trial.number))
                           / "model.pt"),
            searched={
                k: v for k, v in trial.params.items()
                if k.split(".", 1)[0] in (attrs.get("selector"), attrs.get("strategy")) and "." in k
            },
            fidelity=int(attrs.get("fidelity", 0)),
            train_epochs=train_epochs,
            repeat_of=attrs.get("repeat_of"),
            continued_from=attrs.get("continued_from"),
        )

    def _complete(self) -> list[FrozenTrial]:
        return [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "accuracy" in t.user_attrs
        ]

    def trials(self) -> list[TrialRecord]:
        """Every completed trial, by number."""
        return [self._record(t) for t in self._complete()]

    def current(self) -> list[FrozenTrial]:
        """The completed trials that are distinct models at their highest fidelity: no
        repeats, no trial whose model a later one trained further."""
        complete = self._complete()
        superseded = {t.user_attrs.get("continued_from") for t in complete}
        return [t for t in complete
                if t.user_attrs.get("repeat_of") is None and t.number not in superseded]

    def front(self) -> list[TrialRecord]:
        """The Pareto-optimal completed trials over the study's objectives (feasible ones
        only when the study has constraints), sorted by params.

        A trial that compressed no layer (1.0x) is the uncompressed model, not a
        compressed one: it is left off the front (and out of :meth:`pick`'s limits).
        Each model appears once: repeats (``repeat_of``) are left out, and a model trained
        further (``multi_fidelity``) is represented by its highest fidelity only.
        """
        complete = self.current()
        best = {t.number for t in _best(self.study, complete)}
        records = [self._record(t) for t in complete if t.number in best]
        records = [r for r in records if compressed(r)]
        return sorted(records, key=lambda r: (r.params, r.flops, -r.accuracy))

    def hypervolume(self) -> dict[str, float]:
        """Normalized hypervolume of the (accuracy, params) and (accuracy, FLOPs) fronts."""
        ref = self.reference
        records = [self._record(t) for t in self.current()]
        return {
            measure: hypervolume_2d(
                [(r.accuracy, float(getattr(r, measure))) for r in records], float(ref[measure])
            )
            for measure in ("params", "flops")
        }

    def status(self) -> dict[str, Any]:
        """What ``rankopt status --format json`` prints."""
        counts: dict[str, int] = {}
        running = []
        for t in self.study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
            if t.state == TrialState.RUNNING:
                running.append({"trial": t.number, "params": dict(t.params)})
        wanted = self.config.trials
        if wanted is not None and counts.get("COMPLETE", 0) >= wanted:
            # enqueued points the finished run never needed: Optuna's WAITING, not work left
            counts.pop("WAITING", None)
        ref = self.reference
        front = self.front()
        return {
            "study": self.config.name,
            "run_dir": str(self.run_dir),
            "reference": {k: ref[k] for k in ("accuracy", "params", "flops")},
            "trials": counts,
            "trials_wanted": self.config.trials,
            "front_size": len(front),
            # trials that reported an earlier trial's result instead of training it again
            "repeats": sum(t.user_attrs.get("repeat_of") is not None for t in self._complete()),
            # front points per fidelity (0: the first budget; k: promoted k times)
            "front_fidelity": {str(k): sum(r.fidelity == k for r in front)
                               for k in sorted({r.fidelity for r in front})},
            "hypervolume": self.hypervolume(),
            "best_accuracy": max((r.accuracy for r in front), default=None),
            "smallest_params": min((r.params for r in front), default=None),
            "running": running,
        }

    # -- picking ------------------------------------------------------------------------------
    def pick(
        self,
        *,
        trial: int | None = None,
        max_params: float | None = None,
        max_flops: float | None = None,
        min_accuracy: float | None = None,
    ) -> TrialRecord:
        """One completed trial: ``trial`` by number; else the most accurate one within
        ``max_params``/``max_flops``; with ``min_accuracy``, the smallest (fewest params,
        then FLOPs) one at least that accurate (within the limits too). Each such
        choice is on the (accuracy, params/FLOPs) Pareto front.
        """
        records = self.trials()
        if trial is not None:
            if any(v is not None for v in (max_params, max_flops, min_accuracy)):
                raise ConfigError("give either a trial number or limits (max params/flops, min accuracy), not both")
            for rec in records:
                if rec.trial == trial:
                    return self.local_model(rec)
            done = [r.trial for r in records]
            raise ConfigError(
                f"trial {trial} is not a completed trial of study {self.config.name!r}; "
                f"completed trials are {done}"
            )
        if all(v is None for v in (max_params, max_flops, min_accuracy)):
            raise ConfigError(
                "say which model to pick: a trial number, max params, max FLOPs or min accuracy"
            )
        if min_accuracy is not None and not 0 <= min_accuracy <= 1:
            raise ConfigError(
                f"min accuracy must be a fraction in [0, 1] (0.95 for 95 %), got {min_accuracy}"
            )
        ok = [
            r
            for r in (self._record(t) for t in self.current())  # each model once, latest fidelity
            if compressed(r)
            and (max_params is None or r.params <= max_params)
            and (max_flops is None or r.flops <= max_flops)
            and (min_accuracy is None or r.accuracy >= min_accuracy)
        ]
        if not ok:
            limits = ", ".join(
                f"{name} {value:g}"
                for name, value in (
                    ("max params", max_params),
                    ("max flops", max_flops),
                    ("min accuracy", min_accuracy),
                )
                if value is not None
            )
            raise ConfigError(
                f"no completed trial meets {limits}; the front spans params "
                f"{self._span('params')}, FLOPs {self._span('flops')} and accuracy "
                f"{self._span('accuracy')}"
            )
        if min_accuracy is not None:
            return self.local_model(min(ok, key=lambda r: (r.params, r.flops, -r.accuracy)))
        return self.local_model(max(ok, key=lambda r: (r.accuracy, -r.params, -r.flops)))

    def local_model(self, record: TrialRecord) -> TrialRecord:
        """``record``, its folder fetched from the study's artifact store (``artifacts:``)
        when this run directory lacks it: a trial that ran on another machine or driver."""
        path = Path(record.model_path)
        if path.is_file() or self.config.artifacts is None:
            return record
        from rankopt.search.artifact_store import ArtifactStore

        store = ArtifactStore(self.config.artifacts, self.config.name)
        if not store.fetch_trial(record.trial, path.parent) or not path.is_file():
            raise ArtifactError(
                f"trial {record.trial}'s model file {str(path)!r} is missing here and in the "
                f"artifact store {store.describe('trials', str(record.trial))!r}"
            )
        return record

    def _span(self, measure: str) -> str:
        values = [getattr(r, measure) for r in self.front()]
        return f"{min(values):g}..{max(values):g}" if values else "(empty)"

    def architecture(self) -> str:
        """What the run's uncompressed model is: a registered name, a callable, or the class
        of a module passed from Python (which loading needs again as ``model=``)."""
        try:
            base = self.reference.get("base", {})
        except ArtifactError:
            base = {}
        if base.get("model"):
            return f"registered model {base['model']!r} {base.get('kwargs', {})}"
        if base.get("callable"):
            return f"callable {base['callable']!r} {base.get('kwargs', {})}"
        if base.get("class"):
            return f"a module passed from Python, class {base['class']}"
        return "unknown (no reference/metrics.json)"

    def trial_payload(self, record: TrialRecord, *, allow_unchecked: bool = False) -> dict[str, Any]:
        """The checked contents of ``record``'s model file (:func:`rankopt.deploy.artifacts.read_compressed`),
        refused unless the file is that trial's of this study with the spec the storage
        recorded (:func:`rankopt.deploy.trial_files.check_trial_file`)."""
        from rankopt.deploy.artifacts import read_compressed
        from rankopt.deploy.trial_files import check_trial_file

        record = self.local_model(record)
        path = Path(record.model_path)
        if not path.is_file():
            raise ArtifactError(f"trial {record.trial}'s model file {str(path)!r} is missing")
        payload = read_compressed(path, allow_unchecked=allow_unchecked)
        owner = record.repeat_of if record.repeat_of is not None else record.trial
        check_trial_file(payload, path, study=self.config.name, trial=int(owner), spec=record.spec,
                         allow_unchecked=allow_unchecked)
        return payload

    def load_model(self, trial: int, *, model: nn.Module | None = None,
                   allow_unchecked: bool = False) -> nn.Module:
        """The compressed model of a completed trial (see :func:`rankopt.load_compressed`),
        after checking its file is that trial's (:meth:`trial_payload`).

        ``model``: an uncompressed instance of the run's architecture, needed when the study
        was run on a module passed from Python (``reference/metrics.json`` names its class).
        """
        from rankopt.deploy.artifacts import build_compressed

        record = self.pick(trial=trial)
        payload = self.trial_payload(record, allow_unchecked=allow_unchecked)
        try:
            return build_compressed(payload, record.model_path, model=model, allow_modules=self.model_modules,
                                    module_folders=self.model_folders)
        except ArtifactError as exc:
            if model is not None or "names no registered base model" not in str(exc):
                raise
            raise ArtifactError(
                f"trial {trial}'s model was compressed from {self.architecture()}; pass an "
                "uncompressed instance: StudyResult(run_dir).load_model(trial, model=MyNet()) "
                "or rankopt.load_compressed(path, model=MyNet())"
            ) from None

    def evaluate(
        self,
        trials: int | Sequence[int] | None = None,
        *,
        split: str = "test",
        model: nn.Module | None = None,
        data: Any = None,
        device: str | None = None,
        allow_unchecked: bool = False,
    ) -> dict[int, float]:
        """Accuracy of trials' saved models on ``split`` ("test", default, or "val").

        ``trials``: a number, a list, or None for the front. ``data``: the
        :class:`~rankopt.DatasetSplits` when the study ran on data passed from Python
        (else the study file's dataset is loaded). ``model``: see :meth:`load_model`.
        Test accuracies of the study's own data are cached in ``evaluation.json``.
        """
        from rankopt.results.evaluation import evaluate_trials

        if trials is None:
            numbers = [r.trial for r in self.front()]
        elif isinstance(trials, int):
            numbers = [trials]
        else:
            numbers = [int(t) for t in trials]
        return evaluate_trials(self, numbers, split=split, model=model, data=data, device=device,
                               allow_unchecked=allow_unchecked)

    @property
    def model_modules(self) -> list[str]:
        """The module of the study's model factory when the study file named one by import
        path: the study file was trusted to import it, so its run's models may be rebuilt
        from it (a model file on its own never is; see :func:`rankopt.load_compressed`)."""
        model = self.config.model
        return [model.name.partition(":")[0]] if model is not None and ":" in model.name else []

    @property
    def model_folders(self) -> list[str]:
        """Where the study found its model's module (its study file's folder), searched
        first when the run's models are rebuilt."""
        model = self.config.model
        return [model.path] if model is not None and model.path else []

    def __repr__(self) -> str:
        return f"StudyResult({str(self.run_dir)!r})"
