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
import importlib
import inspect
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from rankopt.errors import ConfigError

__all__ = [
    "StudyConfig",
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
]

OBJECTIVE_DIRECTIONS: dict[str, str] = {
    "accuracy": "maximize",
    "params": "minimize",
    "flops": "minimize",
    "latency": "minimize",
}
OBJECTIVES = tuple(OBJECTIVE_DIRECTIONS)
SAMPLERS = ("nsgaii", "tpe", "random")
# in a selector's entry, options that shape its search space rather than parameters
SPACE_KEY = "space"
CALLABLE_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
STUDY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # fullmatch: no trailing newline
# limits on values that would otherwise exhaust memory or time before anything useful runs
MAX_NAME = 100  # a study name is a folder name (file systems allow 255 bytes)
MAX_CPUS = 1024
MAX_GPUS = 64
MAX_TRIALS = 1_000_000
MAX_SCREENING = 100_000
MAX_PROPOSALS = 1000
# keyword arguments of dataset factories that name files or folders
_PATH_KEYS = {"path", "root", "train", "val", "test", "file", "dir", "directory"}
_PATH_SUFFIXES = ("_path", "_dir", "_file", "_root")


class _Strict(BaseModel):
    # inf/NaN is never a meaningful epochs, lr, cpus...; StrictInt keeps `trials: true` from
    # meaning 1
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Range(_Strict):
    """A searched numeric hyperparameter: ``{low, high[, log][, step]}``.

    Integer ``low`` and ``high`` (and ``step``) make an integer range.
    """

    low: float | int
    high: float | int
    log: bool = False
    step: float | int | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.low <= self.high:
            raise ValueError(f"low ({self.low:g}) must be <= high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got low={self.low:g}")
        if self.step is not None and (self.step <= 0 or self.log):
            raise ValueError("step must be > 0 and cannot be combined with log: true")
        return self

    @property
    def is_int(self) -> bool:
        return all(
            isinstance(v, int) and not isinstance(v, bool)
            for v in (self.low, self.high, 1 if self.step is None else self.step)
        )


class Choices(_Strict):
    """A searched categorical hyperparameter: ``{choices: [...]}``."""

    choices: list[Any] = Field(min_length=1)


def parse_param_value(value: Any, where: str) -> Any:
    """A fixed value, a :class:`Range` or :class:`Choices` from a study-file entry."""
    if isinstance(value, (Range, Choices)):
        return value
    if isinstance(value, Mapping):
        keys = set(value)
        try:
            if "choices" in keys:
                choices = value["choices"]
                if isinstance(choices, list):
                    value = {**value, "choices": [_number(c) for c in choices]}
                return Choices(**value)
            if keys & {"low", "high"}:
                return Range(**value)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, prefix=where)) from None
        if keys & _RANGE_KEYS:
            raise ConfigError(
                f"{where}: {dict(value)!r} is neither a fixed value nor a search range; write "
                "a value (2), a range {low: .., high: .., log: true} or {choices: [...]}"
            )
        # a mapping-valued parameter (e.g. the fixed selector's ranks: {pattern: [r1, r2]});
        # the plugin's validate_params checks it
        return dict(value)
    return _number(value)


_RANGE_KEYS = {"low", "high", "log", "step", "choices"}


_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def _number(value: Any) -> Any:
    # YAML 1.1 reads 1e-3 (no dot) as a string; a study file means the number
    if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        return float(value)
    return value


class ModelConfig(_Strict):
    """The model: a registered name (``rankopt plugins``) or ``package.module:callable``."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class DataConfig(_Strict):
    """The dataset: a registered name with its keyword arguments, and the batch size."""

    name: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_size: StrictInt = Field(128, ge=1, le=1_000_000)
    # held out of the training split as the test split (rankopt evaluate, pick, report)
    test_fraction: float | None = Field(None, ge=0, lt=1)


class ReferenceConfig(_Strict):
    """How the reference (uncompressed) model is obtained: trained here, or loaded.

    ``weights`` loads a state_dict file (then ``epochs`` must be 0 or absent);
    otherwise the model is trained for ``epochs`` at ``lr``. ``epochs: 0`` without
    weights uses the model as built (e.g. a pretrained module passed from Python).
    """

    weights: str | None = None
    epochs: float = Field(10.0, ge=0)
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    weight_decay: float = Field(5e-4, ge=0)
    # where it is trained with backend: ray: "driver" (this process) or "cluster" (a Ray
    # task with the trials' resources, so a CPU-only driver can drive GPU workers)
    on: Literal["driver", "cluster"] = "driver"

    @model_validator(mode="before")
    @classmethod
    def _weights_xor_epochs(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("weights") is not None:
            if data.get("epochs") not in (None, 0):
                raise ValueError(
                    "give either weights (load a trained model) or epochs (train it here), "
                    f"not both; got weights={data['weights']!r} and epochs={data['epochs']!r}"
                )
            data = {**data, "epochs": 0}
        return data


class TargetsConfig(_Strict):
    """Which Conv2d/Linear layers to compress: glob patterns on qualified names.

    ``allow_full``: every target may also stay uncompressed, a per-layer choice
    ``decomposer.<layer>: full`` next to the decomposers, so the search learns which
    layers not to touch (often a network's first conv: tiny, and sensitive).
    """

    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    allow_full: bool = False
    # convs with at most this many input channels stay dense (a first conv on gray or RGB
    # images: a few hundred params, the most sensitive layer); 0 compresses them too
    dense_input_channels: int = Field(3, ge=0)


class SamplerConfig(_Strict):
    """The Optuna sampler: ``tpe`` (default), ``nsgaii`` or ``random``, and its options.

    ``tpe`` is Optuna's own default for multi-objective studies; rankopt turns on its
    ``multivariate`` and ``group`` options unless ``options`` sets them, since a trial's
    parameters depend on each other (a selector's threshold and the layers' decomposers).
    On LeNet-5/MNIST it matched NSGA-II's hypervolume and found smaller models within a
    point of the reference on all three seeds (``benchmarks/RESULTS.md``, front quality).
    """

    name: Literal["nsgaii", "tpe", "random"] = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = Field(default_factory=dict)


class ResourcesConfig(_Strict):
    """Resources of one trial on the Ray backend."""

    # a huge count makes the OpenMP runtime allocate per thread until memory runs out
    cpus: float = Field(1.0, gt=0, le=MAX_CPUS)
    gpus: float = Field(0.0, ge=0, le=MAX_GPUS)


class ConstraintsConfig(_Strict):
    """Hard limits the sampler is told about (Optuna's ``constraints_func``)."""

    max_params: float | None = Field(None, gt=0)
    max_flops: float | None = Field(None, gt=0)


class ScreeningConfig(_Strict):
    """The no-fine-tune proxy that picks the search's first points (rankopt.search.screening)."""

    candidates: StrictInt = Field(100, ge=1, le=MAX_SCREENING)  # rank choices tried without training
    keep: StrictInt = Field(8, ge=1, le=MAX_SCREENING)  # of them, how many start the search

    @model_validator(mode="after")
    def _keep_le_candidates(self) -> ScreeningConfig:
        if self.keep > self.candidates:
            raise ValueError(
                f"keep ({self.keep}) must be <= candidates ({self.candidates}); raise "
                "candidates or lower keep"
            )
        return self


class LatencyConfig(_Strict):
    """Where the ``latency`` objective and ``keep_faster_layers`` measure (rankopt.latency):
    the serving runtime, the batch and the threads, timed interleaved with the reference."""

    runtime: Literal["eager", "onnxruntime", "torchscript"] = "eager"
    batch: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)
    rounds: int = Field(15, ge=3)  # interleaved timing rounds (medians)


class MultiFidelityConfig(_Strict):
    """Train further only the models near the front (rankopt.search.fidelity): after the
    search, ``rounds`` times, the share ``keep`` of the previous fidelity's models with the
    best non-dominated rank get ``epochs`` more training epochs, as new trials."""

    rounds: int = Field(1, ge=1)
    epochs: float = Field(2.0, gt=0)
    keep: float = Field(0.25, gt=0, le=1)


class StudyConfig(_Strict):
    """A whole study file (see ``studies/quickstart.yaml`` for a commented example)."""

    name: str
    model: ModelConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    targets: TargetsConfig = Field(default_factory=TargetsConfig)
    decomposers: list[str] = Field(default_factory=lambda: ["tucker2"], min_length=1)
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
    # true = 3 spread points per selector plus its defaults, N = N points
    seed_proposals: bool | int = False
    # measure each decomposed layer against the original and keep the faster form
    keep_faster_layers: bool = False
    # the serving runtime the latency objective and keep_faster_layers measure in
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    # every selected rank rounded to a multiple of this (8: ONNX Runtime on AVX2, 16: AVX-512)
    rank_multiple: int = Field(1, ge=1)
    # try many rank choices without training first; start the search from the best
    screening: ScreeningConfig | None = None
    # a trial whose resolved ranks and hyperparameters equal a finished trial's reports
    # that trial's values (marked repeat_of) instead of training the same model again
    skip_repeats: bool = True
    # train the models near the front further after the search (multi-fidelity)
    multi_fidelity: MultiFidelityConfig | None = None

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
        from rankopt.search.artifact_store import check_artifacts_url

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

    # -- derived ---------------------------------------------------------------------
    @property
    def directions(self) -> list[str]:
        return [OBJECTIVE_DIRECTIONS[o] for o in self.objectives]

    def resolved_run_dir(self, base: str | os.PathLike[str] | None = None) -> Path:
        """The run directory: ``run_dir`` or ``runs/<name>`` under the current directory."""
        return Path(self.run_dir) if self.run_dir else Path(base or ".") / "runs" / self.name


# -- loading -----------------------------------------------------------------------------


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


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in a study file's ``data.kwargs`` are relative to the study file, not
    to the current directory, so a study runs from anywhere. A file named next to a
    ``root`` stays relative to that root (as the dataset reads it)."""
    data = raw.get("data")
    kwargs = data.get("kwargs") if isinstance(data, dict) else None
    if not isinstance(kwargs, dict):
        return

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value and not value.startswith("~") and not Path(value).is_absolute():
            return str((base / value).resolve())
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    has_root = isinstance(kwargs.get("root"), str)
    for key in list(kwargs):
        if key not in _PATH_KEYS and not key.endswith(_PATH_SUFFIXES):
            continue
        if key == "root" or not has_root:
            kwargs[key] = resolve(kwargs[key])


def _signature_names(fn: Any) -> set[str] | None:
    """Keyword names ``fn`` accepts; None when unknown or it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key.sub=value`` overrides as one nested mapping; values are YAML
    (``--set trials=8``, ``--set sampler.seed=3``, ``--set 'decomposers=[svd]'``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(
                f"--set must be key=value with a dotted key (e.g. trials=8, sampler.seed=3), got {item!r}"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r} conflicts with another --set of {part!r}")
            node = child
        node[parts[-1]] = value
    return out


def merge_set(raw: dict[str, Any], sets: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with ``sets`` merged in at every depth (a value replaces, a mapping merges)."""
    merged = copy.deepcopy(raw)
    for key, value in sets.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_set(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


MAX_YAML_NODES = 100_000  # a study file is a few hundred nodes; aliases can expand to billions


class _StudyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (YAML's last-wins would silently drop
    a setting) and documents whose aliases expand beyond :data:`MAX_YAML_NODES` nodes
    (the "billion laughs": a few lines that validation and error messages would expand)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each setting may appear once)",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-untyped-call]


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in ``node`` with every alias expanded (memoized: aliases share their node)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once (and then fails construction)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = total
    return total


def load_yaml(text: str) -> Any:
    """The YAML document in ``text`` (safe tags only, no duplicate keys, bounded size)."""
    loader = _StudyLoader(text)
    try:
        node = loader.get_single_node()  # type: ignore[no-untyped-call]
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"the document expands to {size:,} values through its aliases (&/*); at most "
                f"{MAX_YAML_NODES:,} are allowed"
            )
        return loader.construct_document(node)  # type: ignore[no-untyped-call]
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]


def config_to_yaml(config: StudyConfig) -> str:
    """The resolved config as YAML (what ``study.yaml`` in a run directory holds)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _format_errors(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = ".".join(p for p in (prefix, loc) if p) or "study file"
        kind = err["type"]
        if kind == "extra_forbidden":
            lines.append(f"{where}: unknown key (value {_short(err['input'])}); {_allowed_keys(exc, err)}")
        elif kind == "missing":
            lines.append(f"{where}: required but missing")
        elif kind == "value_error":
            lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{where}: {_short(err['input'])} is not allowed; {err['msg'][0].lower()}{err['msg'][1:]}")
    message = "; ".join(lines)
    return message if len(message) <= 2000 else message[:1997] + "..."


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (an error line stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _allowed_keys(exc: ValidationError, err: Any) -> str:
    model: Any = {"StudyConfig": StudyConfig}.get(exc.title, None)
    if model is None:
        model = {
            c.__name__: c
            for c in (Range, Choices, ModelConfig, DataConfig, ReferenceConfig, TargetsConfig,
                      SamplerConfig, ResourcesConfig, ConstraintsConfig)
        }.get(exc.title)
    for part in err["loc"][:-1]:
        if model is None:
            break
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        model = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
    if model is None:
        return "check the spelling"
    return "allowed keys are " + ", ".join(repr(k) for k in model.model_fields)


# -- checks against the registry and the file system -----------------------------------------


def import_callable(spec: str, where: str) -> Any:
    """The callable named by ``"package.module:attribute"`` (an installed or importable module)."""
    if not CALLABLE_PATTERN.match(spec):
        raise ConfigError(f"{where}: {spec!r} is not of the form 'package.module:callable'")
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{where}: cannot import module {module_name!r} named in {spec!r} ({exc}); "
            "install the package that provides it or fix the name"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {spec!r} is not callable")
    return obj


def builds_a_module(factory: Any) -> bool:
    """True for an ``nn.Module`` subclass, or a Python function annotated to return one:
    the only callables rankopt calls as a model factory (never ``os.system``...)."""
    import typing

    import torch.nn as nn

    if inspect.isclass(factory):
        return issubclass(factory, nn.Module)
    target = inspect.unwrap(factory) if inspect.isfunction(factory) else None
    if target is None:
        return False
    try:
        returns = typing.get_type_hints(target).get("return")
    except Exception:  # unresolvable annotations: not provably a module factory
        return False
    return inspect.isclass(returns) and issubclass(returns, nn.Module)


def import_model_factory(spec: str, where: str) -> Any:
    """``import_callable`` for a model factory, refused unless :func:`builds_a_module`.

    A study file is trusted like a script (it may import its own module); the check
    still keeps ``model: {name: "os:system", kwargs: {command: ...}}`` from being called.
    """
    factory = import_callable(spec, where)
    if not builds_a_module(factory):
        raise ConfigError(
            f"{where}: {spec!r} is neither an nn.Module subclass nor a function annotated to "
            "return one, so rankopt will not call it; name a model class, or annotate the "
            "factory `-> nn.Module`"
        )
    return factory


def _check_kwargs(factory: Any, kwargs: Mapping[str, Any], where: str, extra: tuple[str, ...] = ()) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    names = [
        p.name for p in sig.parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(kwargs) - set(names) - set(extra))
    if unknown:
        raise ConfigError(
            f"{where}: unknown parameter(s) {unknown}; accepted parameters are {names}"
        )


def _check_data_paths(kwargs: Mapping[str, Any], where: str, download_ok: bool = True) -> None:
    """Every file or folder a dataset's keyword arguments name must exist (before any work).

    Relative paths are read from ``root`` when the dataset takes one as the base of its
    files (``npz``), else from the current directory.
    """
    download = bool(kwargs.get("download", False))
    root = kwargs.get("root")
    for key, value in kwargs.items():
        if key not in _PATH_KEYS and not key.endswith(_PATH_SUFFIXES):
            continue
        if key == "root" and download:
            continue  # torchvision creates it
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(values):
            if not isinstance(item, str):
                continue
            path = Path(item).expanduser()
            if key != "root" and isinstance(root, str) and not path.is_absolute():
                path = Path(root).expanduser() / path
            if not path.exists():
                field = f"{where}.{key}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")
                raise ConfigError(
                    f"{field}: path {item!r} does not exist (looked for {str(path)!r}; relative "
                    f"paths are read from a study file's folder, or from the current directory "
                    f"{os.getcwd()!r} for a config given from Python); fix the path"
                    + (" or set download: true" if key == "root" and download_ok else "")
                )


def _check_plugin_params(
    plugin: Any, family: str, name: str, params: Mapping[str, Any], where: str
) -> None:
    """Parameter names against the plugin's declared ones; fixed values and range ends against
    the plugin's own ``validate_params``."""
    known = set(plugin.defaults()) | set(plugin.search_space())
    unknown = sorted(set(params) - known)
    if unknown and (known or family == "strategy"):
        raise ConfigError(
            f"{where}: {family} {name!r} has no parameter(s) {unknown}; its parameters are "
            f"{sorted(known) or '(none)'}"
        )
    parsed = {k: parse_param_value(v, f"{where}.{k}") for k, v in params.items()}
    for key, value in parsed.items():
        probes = (
            [value.low, value.high] if isinstance(value, Range)
            else value.choices if isinstance(value, Choices) else [value]
        )
        for probe in probes:
            try:
                plugin.validate_params({key: probe})
            except ConfigError as exc:
                raise ConfigError(f"{where}.{key}: {probe!r} is not allowed: {exc}") from None


def check_config(config: StudyConfig, *, check_paths: bool = True) -> None:
    """Check plugin names, their parameters, and data paths (before any work)."""
    from rankopt.manager import get_registry
    from rankopt.training import train

    reg = get_registry()
    for field, value in (("train", config.train), ("strategies", config.strategies),
                         ("selectors", config.selectors),
                         ("model.kwargs", config.model.kwargs if config.model else {}),
                         ("data.kwargs", config.data.kwargs)):
        _check_finite(value, field)
    if config.model is not None:
        if ":" in config.model.name:
            factory = import_model_factory(config.model.name, "model.name")
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
    from rankopt.training import check_train_options

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


def _check_finite(value: Any, where: str) -> None:
    """No inf/NaN anywhere in free-form settings (an ``epochs: .inf`` never ends)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not allowed; give a finite number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _enqueue_key_ok(key: str, config: StudyConfig) -> bool:
    if key in ("strategy", "selector"):
        return True
    head, _, rest = key.partition(".")
    if not rest:
        return False
    return head == "decomposer" or head in config.strategies or head in config.selectors


def _named(reg: Any, family: str, name: str, where: str) -> Any:
    from rankopt.errors import UnknownNameError

    try:
        return reg.create(family, name)
    except UnknownNameError as exc:
        raise ConfigError(f"{where}: {exc}") from None
