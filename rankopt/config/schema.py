"""Study files: the pydantic schema and :func:`load_config`.

A study file is YAML, validated in full before any work starts. Unknown keys are
errors (never dropped) and every error names the field path, the value received and
what is allowed. Plugin names (models, datasets, decomposers, rank selectors,
strategies) and parameter names are checked against the registry at load time.

A hyperparameter in ``selectors`` and ``strategies`` is either fixed (``epochs: 2``)
or searched: ``{low: 1e-3, high: 0.1, log: true}`` (optional ``step``) or
``{choices: [...]}``. Parameters a study leaves out use the plugin's own search space
(:meth:`search_space`) and otherwise its :meth:`defaults`. A selector entry may hold
``space: {...}``: options that shape the selector's search space (e.g. the ``fixed``
selector's ``per_layer: true``, one fraction per layer).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, StrictInt, ValidationError, field_validator, model_validator

# the sections, the YAML helpers and the checks live in sibling modules (module size); every
# name stays importable from here
from rankopt.config import checks as _checks
from rankopt.config.checks import (
    CALLABLE_PATTERN,
    _check_data_paths,
    _check_epochs,
    _check_finite,
    _check_kwargs,
    _check_plugin_params,
    _named,
    _resolve_data_paths,
    builds_a_module,
    check_artifacts_url,
    import_callable,
    import_model_factory,
)
from rankopt.config.sections import (
    MAX_CPUS,
    MAX_GPUS,
    MAX_SCREENING,
    SPACE_KEY,
    CalibrationConfig,
    RefinementConfig,
    Choices,
    ConstraintsConfig,
    DataConfig,
    LatencyConfig,
    ModelConfig,
    MultiFidelityConfig,
    Range,
    ReferenceConfig,
    ResourcesConfig,
    SamplerConfig,
    ScreeningConfig,
    TargetsConfig,
    _Strict,
    format_errors,
    parse_param_value,
)
from rankopt.config.yaml_io import MAX_YAML_NODES, load_yaml, merge_set, parse_set
from rankopt.core.errors import ConfigError
from rankopt.core.limits import MAX_RANK_MULTIPLE

__all__ = [
    "StudyConfig",
    "resolve_rank_multiple",
    "auto_multi_fidelity",
    "ModelConfig",
    "DataConfig",
    "ReferenceConfig",
    "TargetsConfig",
    "SamplerConfig",
    "ResourcesConfig",
    "ConstraintsConfig",
    "ScreeningConfig",
    "Range",
    "Choices",
    "OBJECTIVES",
    "OBJECTIVE_DIRECTIONS",
    "load_config",
    "parse_param_value",
    "import_callable",
    "import_model_factory",
    "builds_a_module",
    "config_to_yaml",
    # public names defined in config_sections, config_checks and config_yaml
    "LatencyConfig",
    "MultiFidelityConfig",
    "SPACE_KEY",
    "CALLABLE_PATTERN",
    "MAX_CPUS",
    "MAX_GPUS",
    "MAX_SCREENING",
    "MAX_YAML_NODES",
    "check_config",
    "load_yaml",
    "parse_set",
    "merge_set",
]

# private helpers that other modules (rankopt.study) imported from here before the split
_signature_names = _checks._signature_names

OBJECTIVE_DIRECTIONS: dict[str, str] = {
    "accuracy": "maximize",
    "params": "minimize",
    "flops": "minimize",
    "latency": "minimize",
}
OBJECTIVES = tuple(OBJECTIVE_DIRECTIONS)
SAMPLERS = ("nsgaii", "tpe", "random")
STUDY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch: no trailing newline
# limits on values that would otherwise exhaust memory or time before anything useful runs
MAX_NAME = 100  # a study name is a folder name (file systems allow 255 bytes)
MAX_TRIALS = 1_000_000
MAX_PROPOSALS = 1000
MAX_TRIAL_TIMEOUT = 30 * 24 * 3600  # trial_timeout: 30 days; more means "no limit" (leave it out)


class StudyConfig(_Strict):
    """A whole study file (see ``studies/quickstart.yaml`` for a commented example)."""

    name: str
    model: ModelConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    decomposers: list[str] = Field(default_factory=lambda: ["tucker2", "svd"], min_length=1)
    selectors: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"energy": {}}, min_length=1)
    strategies: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"finetune": {}}, min_length=1
    )
    objectives: list[Literal["accuracy", "params", "flops", "latency"]] = Field(
        default_factory=lambda: ["accuracy", "params", "flops"], min_length=1
    )
    constraints: ConstraintsConfig = Field(default_factory=ConstraintsConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    trials: StrictInt | None = Field(20, ge=1, le=MAX_TRIALS)
    timeout: float | None = Field(None, gt=0)
    backend: Literal["local", "ray"] = "local"
    address: str | None = None
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    max_concurrent: StrictInt = Field(1, ge=1, le=MAX_CPUS)
    # stop a run once this many of its trials failed (None: never; see Study.run)
    max_failures: StrictInt | None = Field(None, ge=1)
    # stop a trial after this many seconds and record it FAIL (reason "timeout"); each
    # trial then runs in a child process (see rankopt.search.watchdog)
    trial_timeout: float | None = Field(None, gt=0, le=MAX_TRIAL_TIMEOUT)
    # "process": each local trial in a child process, so that a plugin's os._exit or a
    # segfault fails that trial, not the run; "none" (default): trials run in the driver
    isolate: Literal["none", "process"] = "none"
    storage: str | None = None
    # an fsspec URL every machine reaches: trial folders and the reference travel through
    # it (see rankopt.search.artifact_store)
    artifacts: str | None = None
    run_dir: str | None = None
    device: str = "auto"
    seed: StrictInt = Field(0, ge=0, lt=2**32)
    train: dict[str, Any] = Field(default_factory=dict)
    enqueue: list[dict[str, Any]] = Field(default_factory=list)
    # enqueue the selectors' one-shot proposals first (see rankopt.search.seeding):
    # true (default) = 3 spread points per selector plus its defaults, N = N points, and
    # with the fixed selector searched per layer the uniform rate sweep and (with vbmf)
    # the VBMF sweep; false = none
    seed_proposals: bool | int = True
    # measure each decomposed layer against the original and keep the faster form
    keep_faster_layers: bool = False
    # the serving runtime the latency objective and keep_faster_layers measure in
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    # data-aware decomposition: svd, tucker2 and cp minimise each layer's output error on
    # these training images' activations (rankopt.compression.calibration); null = weight space
    calibration: CalibrationConfig | None = Field(default_factory=CalibrationConfig)
    # after the proposals, a share of the sampler's trials move the front's models along
    # per-layer rank ladders (rankopt.search.refining); null = the sampler alone
    refinement: RefinementConfig | None = Field(default_factory=RefinementConfig)
    # every selected rank rounded to a multiple of this (8: ONNX Runtime on AVX2, 16: AVX-512);
    # auto (default): the device's vector width, on layers large enough to gain
    # (rankopt.contract.selector.auto_rank_alignment); 1 = exact ranks
    rank_multiple: Literal["auto"] | Annotated[StrictInt, Field(ge=1, le=MAX_RANK_MULTIPLE)] = "auto"
    # try many rank choices without training first; start the search from the best
    screening: ScreeningConfig | None = None
    # a trial whose resolved ranks and hyperparameters equal a finished trial's reports
    # that trial's values (marked repeat_of) instead of training the same model again
    skip_repeats: bool = True
    # train the models near the front further after the search (multi-fidelity); "auto"
    # (default): every trial half its epochs, the better half a full epochs more, for
    # finetune-only studies of at least AUTO_MF_MIN_TRIALS trials (auto_multi_fidelity)
    multi_fidelity: MultiFidelityConfig | Literal["auto"] | None = "auto"

    @field_validator("rank_multiple", mode="before")
    @classmethod
    def _rank_multiple(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_RANK_MULTIPLE):
            return v
        raise ValueError(
            f"must be 'auto' (the device's vector width) or an integer in [1, {MAX_RANK_MULTIPLE:,}] "
            f"(1: exact ranks), got {v!r}"
        )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > MAX_NAME:
            raise ValueError(
                f"a study name of {len(v)} characters is too long; use at most {MAX_NAME} "
                "(it names the run directory)"
            )
        if not STUDY_NAME_PATTERN.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a valid study name; use letters, digits, '_', '.', '-' "
                "(it names the run directory and the Optuna study)"
            )
        return v

    @field_validator("selectors", "strategies", mode="before")
    @classmethod
    def _names_to_mapping(cls, v: Any) -> Any:
        # `strategies: [finetune, nrmf]` is shorthand for `{finetune: {}, nrmf: {}}`
        if isinstance(v, (list, tuple)) and all(isinstance(name, str) for name in v):
            return {name: {} for name in v}
        if isinstance(v, Mapping):
            return {k: ({} if p is None else p) for k, p in v.items()}
        return v

    @field_validator("seed_proposals")
    @classmethod
    def _seed_proposals(cls, v: bool | int) -> bool | int:
        if not isinstance(v, bool) and not 0 <= v <= MAX_PROPOSALS:
            raise ValueError(
                f"{v} is not allowed; give true, false or a number of points per selector "
                f"from 0 to {MAX_PROPOSALS}"
            )
        return v

    @field_validator("run_dir")
    @classmethod
    def _run_dir(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "\x00" in v):
            raise ValueError(
                f"{v!r} is not a directory path; give a folder such as runs/my-study, or leave "
                "run_dir out for runs/<name>"
            )
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is None:
            return v
        head, _, rest = v.partition("://")
        database = rest[1:] if rest.startswith("/") else rest
        if head.startswith("sqlite") and (
            not database or database.split("?")[0] == ":memory:" or "mode=memory" in database
        ):
            raise ValueError(
                f"{v!r} is an in-memory database: no trial would survive the run and "
                "`rankopt status`/`pick` could not read it; leave storage out (optuna.db in the "
                "run directory) or give sqlite:///path/optuna.db"
            )
        return v

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"objectives must not repeat, got {v}")
        return v

    @field_validator("artifacts")
    @classmethod
    def _artifacts(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return check_artifacts_url(v)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("artifacts: ")) from None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^(auto|cpu|mps|cuda(:\d+)?)$", v):
            raise ValueError(f"{v!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return v

    @model_validator(mode="after")
    def _stop_rule(self) -> StudyConfig:
        if self.trials is None and self.timeout is None:
            raise ValueError("give trials, timeout or both; with neither the study never ends")
        return self

    @model_validator(mode="after")
    def _multi_fidelity(self) -> StudyConfig:
        if self.multi_fidelity == "auto":
            # set through __dict__: validate_assignment would run the validators again
            self.__dict__["multi_fidelity"] = auto_multi_fidelity(self)
        mf = self.multi_fidelity
        others = sorted(set(self.strategies) - {"finetune"})
        if isinstance(mf, MultiFidelityConfig) and mf.first is not None and others:
            raise ValueError(
                f"multi_fidelity.first splits the finetune strategy's epochs, but the study also "
                f"has {others}, which train in phases; drop first and set the strategies' epochs "
                "and multi_fidelity.epochs yourself")
        return self

    # -- derived ---------------------------------------------------------------------
    @property
    def directions(self) -> list[str]:
        return [OBJECTIVE_DIRECTIONS[o] for o in self.objectives]

    def resolved_run_dir(self, base: str | os.PathLike[str] | None = None) -> Path:
        """The run directory: ``run_dir`` or ``runs/<name>`` under the current directory."""
        return Path(self.run_dir) if self.run_dir else Path(base or ".") / "runs" / self.name


# multi_fidelity "auto" turns on from this many trials: the promotion ranks the first rung,
# and with fewer models half of them is hardly a choice
AUTO_MF_MIN_TRIALS = 8
AUTO_MULTI_FIDELITY = {"rounds": 1, "keep": 0.5, "first": 0.5}


def resolve_rank_multiple(config: StudyConfig, device: Any = None) -> Any:
    """``config.rank_multiple`` for ``select_spec``: an int as given, or for ``auto`` the
    :class:`~rankopt.contract.selector.RankAlignment` of the device the trials run
    on (``device``, default the study's, resolved here)."""
    if config.rank_multiple != "auto":
        return config.rank_multiple
    from rankopt.training.devices import resolve_device
    from rankopt.contract.selector import auto_rank_alignment

    return auto_rank_alignment(resolve_device(config.device if device is None else device))


def auto_multi_fidelity(config: StudyConfig) -> MultiFidelityConfig | None:
    """What ``multi_fidelity: auto`` (the default) means for ``config``: every trial trains
    half its fine-tuning epochs and the better half by non-dominated rank then trains a
    full ``epochs`` more (:data:`AUTO_MULTI_FIDELITY`, the same epochs in all), when the
    study fine-tunes with the ``finetune`` strategy only, for at least
    :data:`AUTO_MF_MIN_TRIALS` trials, and not for 0 epochs; else None (off).

    Why the default: on LeNet-5/MNIST and ResNet-20/CIFAR-10 it had the highest
    hypervolume for the same epochs (``benchmarks/RESULTS.md``, "Front quality"). Other
    strategies split their epochs between phases, so no single split fits them.
    """
    if set(config.strategies) != {"finetune"} or config.trials is None or config.trials < AUTO_MF_MIN_TRIALS:
        return None
    epochs = config.strategies["finetune"].get("epochs")
    if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs <= 0:
        return None
    return MultiFidelityConfig(**AUTO_MULTI_FIDELITY)


# -- loading -----------------------------------------------------------------------------


def check_config(config: StudyConfig, *, check_paths: bool = True) -> None:
    """Check plugin names, their parameters, and data paths (before any work)."""
    from rankopt.contract.manager import get_registry
    from rankopt.training.loop import train

    reg = get_registry()
    for field, value in (("train", config.train), ("strategies", config.strategies),
                         ("selectors", config.selectors),
                         ("model.kwargs", config.model.kwargs if config.model else {}),
                         ("data.kwargs", config.data.kwargs)):
        _check_finite(value, field)
        _check_epochs(value, field)
    if config.model is not None:
        if ":" in config.model.name:
            factory = import_model_factory(config.model.name, "model.name", [config.model.path])
        else:
            factory = reg.record("models", config.model.name).factory
        _check_kwargs(factory, config.model.kwargs, "model.kwargs")
    if config.data.name is not None:
        factory = reg.record("datasets", config.data.name).factory
        _check_kwargs(factory, config.data.kwargs, "data.kwargs")
        if check_paths:
            # suggest download: true only to datasets that take it (npz refuses it)
            takes = _signature_names(factory)
            _check_data_paths(config.data.kwargs, "data.kwargs", download_ok=takes is None or "download" in takes)
    if check_paths and config.reference.weights and not Path(config.reference.weights).is_file():
        raise ConfigError(
            f"reference.weights: file {config.reference.weights!r} does not exist; give the "
            "path of a state_dict saved with torch.save(model.state_dict(), path)"
        )
    for i, name in enumerate(config.decomposers):
        _named(reg, "decomposers", name, f"decomposers[{i}]")
    for name, params in config.selectors.items():
        selector = _named(reg, "rank_selectors", name, "selectors")
        params = dict(params)
        space = params.pop(SPACE_KEY, None) or {}
        if not isinstance(space, Mapping):
            raise ConfigError(
                f"selectors.{name}.{SPACE_KEY}: must be a mapping of search-space options "
                f"(e.g. {{per_layer: true}}), got {space!r}"
            )
        try:
            selector.search_space((), **space)
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"selectors.{name}.{SPACE_KEY}: {exc}") from None
        _check_plugin_params(selector, "rank selector", name, params, f"selectors.{name}")
    for name, params in config.strategies.items():
        strategy = _named(reg, "strategies", name, "strategies")
        _check_plugin_params(strategy, "strategy", name, params, f"strategies.{name}")
    _check_kwargs(train, config.train, "train", extra=())
    reserved = {"epochs", "lr", "device", "extra_loss", "step_callback", "params", "progress", "seed"}
    bad = sorted(set(config.train) & reserved)
    if bad:
        raise ConfigError(
            f"train: {bad} cannot be set here (the strategy or the study sets them); allowed "
            "keys are optimizer, momentum, weight_decay, schedule, step_size, gamma, amp, "
            "grad_clip, max_steps"
        )
    from rankopt.training.loop import check_train_options

    checked = {k: v for k, v in config.train.items() if k in inspect.signature(check_train_options).parameters}
    try:
        check_train_options(**checked)
    except ConfigError as exc:
        raise ConfigError(f"train.{exc}") from None
    if config.backend == "local" and config.address:
        raise ConfigError(
            f"address: {config.address!r} is only used by backend 'ray'; set backend: ray "
            "or remove address"
        )
    for i, point in enumerate(config.enqueue):
        for key in point:
            if not _enqueue_key_ok(key, config):
                raise ConfigError(
                    f"enqueue[{i}].{key}: unknown parameter name; names are 'strategy', "
                    "'selector', '<strategy>.<param>', '<selector>.<param>' and "
                    "'decomposer.<layer>'"
                )


def _enqueue_key_ok(key: str, config: StudyConfig) -> bool:
    if key in ("strategy", "selector"):
        return True
    head, _, rest = key.partition(".")
    if not rest:
        return False
    return head == "decomposer" or head in config.strategies or head in config.selectors


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | StudyConfig,
    *,
    check_plugins: bool = True,
    check_paths: bool = True,
    **overrides: Any,
) -> StudyConfig:
    """Read, validate and check a study file (a path, a mapping or a :class:`StudyConfig`).

    ``overrides`` replace top-level keys (mappings are merged one level deep, e.g.
    ``sampler={"seed": 3}``). Raises :class:`ConfigError` naming the field, the value
    and what is allowed.
    """
    if isinstance(source, StudyConfig):
        raw: dict[str, Any] = source.model_dump(mode="json", exclude_unset=True)
        raw.setdefault("name", source.name)
    elif isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"study file {str(path)!r} does not exist or is not a file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"study file {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); give a "
                "readable UTF-8 YAML file"
            ) from None
        try:
            raw = load_yaml(text)
        except yaml.YAMLError as exc:
            # one line: YAML's message spans several (problem, then a caret under the text)
            detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise ConfigError(f"study file {str(path)!r} is not valid YAML: {detail}") from None
        if not isinstance(raw, dict):
            raise ConfigError(
                f"study file {str(path)!r} must hold a mapping of settings, "
                f"got {type(raw).__name__}"
            )
        raw.setdefault("name", path.stem)
        _resolve_data_paths(raw, path.parent)
        _note_own_module(raw, path.parent)
    for key, value in overrides.items():
        if value is None:
            continue
        current = raw.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping) and key not in (
            "selectors",
            "strategies",
        ):
            raw[key] = {**current, **value}
        else:
            raw[key] = value
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    if check_plugins:
        check_config(config, check_paths=check_paths)
    return config


def _note_own_module(raw: dict[str, Any], folder: Path) -> None:
    """``model.path``: the study file's folder, when the module a ``module:factory`` model
    name names lies there (looked up before the import path; see rankopt.config.own_model)."""
    from rankopt.config.own_model import module_file_in

    model = raw.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    if isinstance(name, str) and ":" in name and model.get("path") is None:
        if module_file_in(folder, name.partition(":")[0]) is not None:
            model["path"] = str(folder.resolve())


def config_to_yaml(config: StudyConfig) -> str:
    """The resolved config as YAML (what ``study.yaml`` in a run directory holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _format_errors(exc: ValidationError, prefix: str = "") -> str:
    """:func:`rankopt.config.sections.format_errors` with StudyConfig known (its
    "allowed keys are ..." hints)."""
    return format_errors(exc, prefix, root=StudyConfig)
