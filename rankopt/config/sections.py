"""The sections of a study file: the pydantic models under :class:`rankopt.config.schema.StudyConfig`.

Also the searched-parameter values (:class:`Range`, :class:`Choices`,
:func:`parse_param_value`) and the one-line messages made from pydantic's errors. This
module sits below :mod:`rankopt.config.schema` (which re-exports all of it) and imports nothing
of rankopt but its errors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from rankopt.core.errors import ConfigError, did_you_mean
from rankopt.core.limits import MAX_EPOCHS

__all__ = [
    "ModelConfig",
    "RefinementConfig",
    "DataConfig",
    "ReferenceConfig",
    "TargetsConfig",
    "SamplerConfig",
    "ResourcesConfig",
    "ConstraintsConfig",
    "ScreeningConfig",
    "LatencyConfig",
    "MultiFidelityConfig",
    "Range",
    "Choices",
    "SPACE_KEY",
    "MAX_CPUS",
    "MAX_GPUS",
    "MAX_SCREENING",
    "parse_param_value",
    "format_errors",
]

# in a selector's entry, options that shape its search space rather than parameters
SPACE_KEY = "space"
# limits on values that would otherwise exhaust memory or time before anything useful runs
MAX_CPUS = 1024
MAX_GPUS = 64
MAX_SCREENING = 100_000


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
            raise ConfigError(format_errors(exc, prefix=where)) from None
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
    """The model: a registered name (``rankopt plugins``) or ``module:callable``.

    ``path``: the folder where the module of a ``module:callable`` name is looked up
    first, before the import path; set to the study file's folder when the module lies
    beside it (``mynet.py`` next to ``study.yaml``).
    """

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None


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
    epochs: float = Field(10.0, ge=0, le=MAX_EPOCHS)  # rankopt.core.limits
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
    # a factorized form must save at least this share of a layer's params and FLOPs, else
    # the layer stays dense: near-full ranks (Tucker-2 57x57 of 64) ran 0.85-0.94x the
    # dense model's speed in ONNX Runtime for no saving; 0 accepts any saving
    min_saving: float = Field(0.1, ge=0.0, lt=1.0)


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


class CalibrationConfig(_Strict):
    """Data-aware decomposition (rankopt.compression.calibration): each target's input statistics from
    ``images`` training images, collected once per reference and shared by every trial.
    ``damping`` (relative to the mean input energy) keeps the whitening invertible;
    ``spectra: output`` makes the spectrum-reading selectors' p and VBMF read the share
    of output energy, ``weight`` the weight's own spectrum. ``mode: independent`` (default)
    whitens each layer by the reference's own inputs only (no per-trial passes);
    ``sequential`` fits every trial's layers in forward order, each to the inputs the
    compressed layers before it give it (reduced-rank regression,
    rankopt.compression.sequential; one forward pass per target over the images, per trial).
    Sequential is far more accurate before fine-tuning, but 6 of 33 LeNet-5 front trials
    diverged in their first fine-tuning steps with it (benchmarks/RESULTS.md, "Refinement
    and data-aware ablations: fronts (mnist)"), none with ``independent``: so it is opt-in."""

    images: StrictInt = Field(512, ge=1, le=100_000)
    damping: float = Field(0.01, gt=0, le=1)
    spectra: Literal["output", "weight"] = "output"
    mode: Literal["independent", "sequential"] = "independent"
    # sequential only: the regression's shrinkage towards each layer's own weight
    ridge: float = Field(0.1, gt=0, le=10)


class RefinementConfig(_Strict):
    """The refining sampler (rankopt.search.refining): a share of the trials the sampler
    proposes become moves from the current front along per-layer rank ladders. Needs the
    ``fixed`` selector searched per layer (``space: {per_layer: true}``); without it the
    sampler proposes every trial. ``share``: the share of the sampler's own trials refined;
    ``near``: how far below the best accuracy (absolute) a front member still counts as near
    the line for the cut and swap moves; ``cut``: the share of params or FLOPs one cut removes."""

    share: float = Field(0.5, gt=0, le=1)
    near: float = Field(0.02, gt=0, le=1)
    cut: float = Field(0.1, gt=0, lt=1)


class LatencyConfig(_Strict):
    """Where the ``latency`` objective and ``keep_faster_layers`` measure (rankopt.compression.latency):
    the serving runtime, the batch and the threads, timed interleaved with the reference."""

    runtime: Literal["eager", "onnxruntime", "torchscript"] = "eager"
    batch: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)
    rounds: int = Field(15, ge=3)  # interleaved timing rounds (medians)


class MultiFidelityConfig(_Strict):
    """Train further only the models near the front (rankopt.search.fidelity): after the
    search, ``rounds`` times, the share ``keep`` of the previous fidelity's models with the
    best non-dominated rank get ``epochs`` more training epochs, as new trials.

    With ``first`` (in (0, 1)) the study spends the fine-tuning epochs it would spend
    without multi-fidelity, spread differently: every trial of the ``finetune`` strategy
    trains ``first`` of its ``epochs``, and, ``epochs`` not given, each promoted model
    then trains ``(1 - first) / keep`` of them more (``first: 0.5, keep: 0.5``: half,
    then the better half a full ``epochs`` more; the study default, see
    ``rankopt.config.schema.auto_multi_fidelity``).
    """

    rounds: int = Field(1, ge=1)
    # None: 2 epochs, or with first what keeps the study's epochs (continuation_epochs)
    epochs: float | None = Field(None, gt=0, le=MAX_EPOCHS)  # rankopt.core.limits
    keep: float = Field(0.25, gt=0, le=1)
    first: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _split_once(self) -> MultiFidelityConfig:
        if self.split and self.rounds != 1:
            raise ValueError(
                f"multi_fidelity.rounds: {self.rounds} with first and no epochs: the split of "
                "each trial's epochs is defined for one round; use rounds: 1, or give epochs")
        return self

    @property
    def split(self) -> bool:
        """True when the promoted models' epochs follow from ``first`` (no ``epochs`` given)."""
        return self.first is not None and self.epochs is None

    def continuation_epochs(self, trained: float) -> float:
        """Epochs a promoted model trains more; ``trained``: the epochs its trial trained."""
        if self.split:
            assert self.first is not None
            return trained / self.first * (1.0 - self.first) / self.keep
        return 2.0 if self.epochs is None else self.epochs


# -- error messages ----------------------------------------------------------------------------


def format_errors(exc: ValidationError, prefix: str = "", root: type[BaseModel] | None = None) -> str:
    """One line per error of ``exc``: the field path, the value received, what is allowed.

    ``root`` is the model ``exc`` may come from besides the sections here (rankopt.config.schema
    passes StudyConfig, which is defined above this module), for "allowed keys are ...".
    """
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where = ".".join(p for p in (prefix, loc) if p) or "study file"
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_keys(exc, err, root)
            close = did_you_mean(err["loc"][-1], allowed[1]) if allowed[1] else ""
            # a close match is the answer; the whole list only when there is none
            tail = "" if close else f"; {allowed[0]}"
            lines.append(f"{where}: unknown key{close} (value {_short(err['input'], 60)}){tail}")
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


def _allowed_keys(exc: ValidationError, err: Any, root: type[BaseModel] | None) -> tuple[str, list[str]]:
    model: Any = None if root is None else {root.__name__: root}.get(exc.title, None)
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
        return "check the spelling", []
    keys = list(model.model_fields)
    return "allowed keys are " + ", ".join(repr(k) for k in keys), keys
