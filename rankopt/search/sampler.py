"""The study's Optuna sampler and study object, and how constraints reach the sampler."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import optuna

from rankopt.config.schema import StudyConfig
from rankopt.core.errors import ConfigError
from rankopt.search.objective import SET_CONSTRAINT

__all__ = [
    "ConstraintsFunc",
    "TPE_DEFAULTS",
    "SESSIONS_ATTR",
    "make_sampler",
    "create_study",
    "reseed_later_sessions",
    "SAMPLER_CONFIG_ATTR",
    "sampler_config",
]

# the StudyConfig a sampler was built from (its seed as given to it): a pickled copy of the
# study (Ray Tune's searcher state) rebuilds the sampler from it, since Optuna 5's samplers
# hold a threading lock and do not pickle
SAMPLER_CONFIG_ATTR = "_rankopt_study_config"

# TPE options rankopt sets unless sampler.options names them (see SamplerConfig)
TPE_DEFAULTS: dict[str, Any] = {"multivariate": True, "group": True}


class ConstraintsFunc:
    """Optuna ``constraints_func`` for Optuna < 5: ``value - limit`` per limit (<= 0 is
    feasible). A module-level class (not a closure) so the sampler pickles for Ray."""

    def __init__(self, max_params: float | None, max_flops: float | None) -> None:
        self.limits = [(k, v) for k, v in (("params", max_params), ("flops", max_flops)) if v is not None]

    def __call__(self, trial: optuna.trial.FrozenTrial) -> list[float]:
        out = []
        for key, limit in self.limits:
            value = trial.user_attrs.get(key)
            out.append(float(value) - float(limit) if value is not None else 1.0)
        return out


def make_sampler(config: StudyConfig) -> optuna.samplers.BaseSampler:
    """The study's Optuna sampler; on Optuna < 5 it is given the constraints here (newer
    Optuna learns them per trial from ``Trial.set_constraint``, see ``set_constraints``)."""
    opts = dict(config.sampler.options)
    constraints = None
    if config.constraints.max_params is not None or config.constraints.max_flops is not None:
        constraints = ConstraintsFunc(config.constraints.max_params, config.constraints.max_flops)
    cls: Any = {
        "nsgaii": optuna.samplers.NSGAIISampler,
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
    }[config.sampler.name]
    if config.sampler.name == "tpe":
        opts = {**TPE_DEFAULTS, **opts}
    kwargs: dict[str, Any] = {"seed": config.sampler.seed, **opts}
    if constraints is not None and not SET_CONSTRAINT:
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
        with warnings.catch_warnings():
            # multivariate/group TPE are rankopt's defaults on purpose; Optuna's
            # "experimental" notice about them would only be noise in every study
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sampler.options: {exc}") from None
    setattr(sampler, SAMPLER_CONFIG_ATTR, config)
    return sampler  # type: ignore[no-any-return]


def sampler_config(sampler: optuna.samplers.BaseSampler, default: StudyConfig) -> StudyConfig:
    """The config ``sampler`` was made from by :func:`make_sampler` (``default`` for a
    sampler made elsewhere)."""
    return getattr(sampler, SAMPLER_CONFIG_ATTR, default)  # type: ignore[no-any-return]


def create_study(config: StudyConfig, storage: Any, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create the study in ``storage``, or load it when it exists (a rerun continues it)."""
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


SESSIONS_ATTR = "rankopt_sessions"


def reseed_later_sessions(study: optuna.Study, config: StudyConfig) -> None:
    """Give every later session on a study (a rerun, or a second worker) its own sampler
    seed, ``sampler.seed + k`` for the k-th: with one seed, two workers (or a rerun) would
    propose the same random points again. The first session keeps the seed as given, so
    a study file and seed still give the same trials."""
    k = int(study.user_attrs.get(SESSIONS_ATTR, 0))
    study.set_user_attr(SESSIONS_ATTR, k + 1)
    if k and config.sampler.seed is not None:
        sampler = config.sampler.model_copy(update={"seed": config.sampler.seed + k})
        study.sampler = make_sampler(config.model_copy(update={"sampler": sampler}))
