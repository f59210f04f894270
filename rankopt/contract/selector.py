"""The base class of rank selectors.

A selector has two entry points:

* :meth:`RankSelector.select` turns one layer's weight (and its cached spectra) into
  ranks for a decomposer;
* :meth:`RankSelector.select_layers` does it for a set of layers of a model. The base
  implementation calls :meth:`select` layer by layer, so a per-layer selector inherits
  it as is; a global selector (the ``budget`` allocator) overrides it.

:func:`rankopt.compression.selection.select_spec` wraps :meth:`select_layers` with the checks every
selector shares (supported modules, ranks in range, layers whose factorized form would
not be smaller stay full) and returns a compression spec.

Parameters are declared once, as a pydantic model in :attr:`RankSelector.Params`
(``extra="forbid"``), from which :meth:`defaults` and :meth:`validate_params` follow;
a bad value fails with a :class:`~rankopt.ConfigError` naming the parameter, the value
and the allowed range.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn as nn
from optuna.distributions import BaseDistribution
from pydantic import BaseModel, ConfigDict, ValidationError

from rankopt.core.errors import ConfigError

from rankopt.core.types import Cost, LayerInfo, SpectralSource
from rankopt.contract.decomposer import Decomposer

__all__ = [
    "RankSelector", "CheckedRankSelector", "LayerChoice", "SelectorParams", "clamp_ranks", "describe_constraints", "round_ranks",
    "RankAlignment", "auto_rank_alignment",
]


@dataclass(frozen=True)
class LayerChoice:
    """The selector's decision for one layer: ranks, or None with the reason it stays full.

    ``cost`` is the factorized layer's cost at ``ranks`` and ``original_cost`` the
    layer's own (both for one sample at the layer's input size; FLOPs are 0 where the
    input size is unknown). :func:`rankopt.compression.selection.select_spec` fills them in.
    """

    name: str
    decomposer: str
    ranks: tuple[int, ...] | None
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    cost: Cost | None = None
    original_cost: Cost | None = None

    @property
    def compressed(self) -> bool:
        return self.ranks is not None


class SelectorParams(BaseModel):
    """Base of the pydantic models that declare a selector's parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=False)


def describe_constraints(model: type[BaseModel], field_name: str) -> str:
    """The allowed values of ``field_name`` in words, e.g. ``"a number in (0, 1]"``."""
    import typing

    info = model.model_fields.get(field_name)
    if info is None:
        return ""
    lo = hi = None
    lo_open = hi_open = False
    for meta in info.metadata:
        for attr, is_lo, is_open in (("gt", True, True), ("ge", True, False), ("lt", False, True), ("le", False, False)):
            value = getattr(meta, attr, None)
            if value is not None:
                if is_lo:
                    lo, lo_open = value, is_open
                else:
                    hi, hi_open = value, is_open
    ann = info.annotation
    if typing.get_origin(ann) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if len(args) == 1:  # Optional[X]
        ann = args[0]
    kind = {int: "an integer", float: "a number", bool: "true or false"}.get(ann, "")  # type: ignore[arg-type]
    if lo is None and hi is None:
        return kind
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    lo_s = "-inf" if lo is None else f"{lo:g}"
    hi_s = "inf" if hi is None else f"{hi:g}"
    if lo is None:
        left = "("
    if hi is None:
        right = ")"
    return f"{kind or 'a value'} in {left}{lo_s}, {hi_s}{right}"


def clamp_ranks(ranks: Sequence[int], largest: Sequence[int], floor: int = 1) -> tuple[int, ...]:
    """Each rank clamped to ``[min(floor, largest), largest]``."""
    return tuple(max(min(floor, hi), min(int(r), hi)) for r, hi in zip(ranks, largest))


def round_ranks(ranks: Sequence[int], largest: Sequence[int], multiple: int) -> tuple[int, ...]:
    """Each rank rounded to the nearest multiple of ``multiple`` (ties up, at least one
    multiple), or to the layer's largest rank where that is smaller.

    Ranks that are multiples of 8 (16 on AVX-512) fill the SIMD blocks of ONNX
    Runtime's convs: rank 16 ran up to 1.76x faster than 14. Nearest rather than up
    keeps a budget selector's total close to its budget; ``multiple=1`` is the identity.
    """
    if multiple <= 1:
        return tuple(int(r) for r in ranks)
    return tuple(
        min(int(hi), max(multiple, multiple * math.floor(int(r) / multiple + 0.5)))
        for r, hi in zip(ranks, largest)
    )


@dataclass(frozen=True)
class RankAlignment:
    """Ranks rounded to ``multiple`` (:func:`round_ranks`) only on layers whose every
    largest rank is at least ``min_largest``: smaller layers keep their exact ranks,
    since a rounding step there is a large share of the layer and its 1x1 convs are
    overhead-bound anyway. ``rank_multiple: auto`` resolves to one of these
    (:func:`auto_rank_alignment`)."""

    multiple: int
    min_largest: int = 0
    #: ranks under one ``multiple`` stay exact (``auto``): rounding rank 3 up to 16
    #: multiplies that factor's cost by 5 for a SIMD block the kernel half-fills anyway,
    #: and it takes away the smallest models (LeNet-5's 800x500 layer at rank 16 alone is
    #: more than the whole 16,740-param model of the MNIST front)
    exact_below: bool = False

    def apply(self, ranks: Sequence[int], largest: Sequence[int]) -> tuple[int, ...]:
        if self.multiple <= 1 or min(int(h) for h in largest) < self.min_largest:
            return tuple(int(r) for r in ranks)
        rounded = round_ranks(ranks, largest, self.multiple)
        if self.exact_below:
            return tuple(int(r) if int(r) < self.multiple else q for r, q in zip(ranks, rounded))
        return rounded


#: layers below this many SIMD blocks of rank keep exact ranks under ``auto``
AUTO_MIN_BLOCKS = 4


def auto_rank_alignment(device: Any) -> RankAlignment:
    """The alignment ``rank_multiple: auto`` means on ``device`` (a torch.device or str).

    CUDA: 8 (tensor-core tiles of half-precision GEMMs and convs). CPU: the vector width
    in float32 lanes that PyTorch's kernels were dispatched for: 16 on AVX-512, 8 on
    AVX2 (measured in ONNX Runtime: rank 16 ran up to 1.76x faster than 14), else 4
    (NEON, SSE). Layers whose largest rank is under ``AUTO_MIN_BLOCKS`` multiples keep
    exact ranks, and so do ranks under one multiple.
    """
    import torch

    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        multiple = 8
    else:
        capability = str(torch.backends.cpu.get_cpu_capability()).upper()
        multiple = 16 if "AVX512" in capability else 8 if "AVX2" in capability else 4
    return RankAlignment(multiple, AUTO_MIN_BLOCKS * multiple, exact_below=True)


def ceil_fraction(fraction: float, largest: int) -> int:
    """``ceil(fraction * largest)`` robust to float noise (0.1 * 30 is 3, not 4)."""
    return math.ceil(fraction * largest - 1e-9)


class RankSelector(ABC):
    """Turns a layer's weight (and its cached spectra) into ranks for a decomposer.

    Subclasses set ``name`` and ``description``, declare their parameters as a
    :class:`SelectorParams` subclass in ``Params``, implement :meth:`select`, and
    declare the search space of their parameters in :meth:`search_space` (Optuna
    distributions, so the local and the Ray backend sample them alike).

    A selector without ``Params`` accepts exactly the names of :meth:`defaults` and
    :meth:`search_space`; unknown names always fail, they are never dropped.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[SelectorParams] | None] = None
    #: True for a selector that reads the decomposer's ``rank_matrices`` (the spectral
    #: ones): it works with the decomposers that provide them and refuses the others
    #: with a ConfigError. False: it claims to work with every decomposer.
    #: :mod:`rankopt.testing` checks it against each installed decomposer it claims.
    needs_rank_matrices: ClassVar[bool] = False

    # -- parameters -------------------------------------------------------------------
    def search_space(self, layers: Sequence[LayerInfo] = (), **options: Any) -> dict[str, BaseDistribution]:
        """The default search space of this selector's parameters.

        ``options`` are selector-specific switches of the space's shape (e.g. the
        ``fixed`` selector's ``per_layer``); unknown ones fail.
        """
        self._reject_space_options(options, ())
        return {}

    def _reject_space_options(self, options: Mapping[str, Any], known: Sequence[str]) -> None:
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown search-space option(s) {unknown} for rank selector {self.name!r}; "
                f"known options are {sorted(known) or '(none)'}"
            )

    def defaults(self) -> dict[str, Any]:
        """Parameter values used when a study fixes none."""
        if self.Params is None:
            return {}
        return self.Params().model_dump()

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The complete, checked parameters (defaults filled in).

        Raises ConfigError naming the parameter, the value received and what is
        allowed; unknown names fail with the list of known ones. Idempotent: its
        output is valid input.
        """
        if not isinstance(params, Mapping):
            raise ConfigError(
                f"parameters of rank selector {self.name!r} must be a mapping of name to value, "
                f"got {type(params).__name__}"
            )
        if self.Params is None:
            known = set(self.defaults()) | set(self.search_space())
            unknown = sorted(set(params) - known)
            if unknown:
                raise ConfigError(
                    f"unknown parameter(s) {unknown} for rank selector {self.name!r}; "
                    f"known parameters are {sorted(known) or '(none)'}"
                )
            return {**self.defaults(), **dict(params)}
        try:
            checked = self.Params(**dict(params))
        except ValidationError as exc:
            raise ConfigError(self._explain(exc, params)) from None
        return checked.model_dump()

    def _explain(self, exc: ValidationError, params: Mapping[str, Any]) -> str:
        assert self.Params is not None
        known = sorted(self.Params.model_fields)
        parts = []
        for err in exc.errors():
            loc = err.get("loc") or ()
            if not loc:  # a rule across parameters
                msg = str(err.get("msg", "invalid parameters")).removeprefix("Value error, ")
                parts.append(f"rank selector {self.name!r}: {msg}")
                continue
            top = str(loc[0])
            where = ".".join(str(p) for p in loc)
            if err.get("type") == "extra_forbidden":
                parts.append(
                    f"unknown parameter {top!r} for rank selector {self.name!r}; "
                    f"known parameters are {known}"
                )
                continue
            allowed = describe_constraints(self.Params, top) if len(loc) == 1 else ""
            got = err.get("input", params.get(top))
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if allowed:
                parts.append(
                    f"rank selector {self.name!r}: parameter {where!r} must be {allowed}, "
                    f"got {got!r} ({msg})"
                )
            else:
                parts.append(f"rank selector {self.name!r}: parameter {where!r}: {msg}")
        return "; ".join(parts)

    # -- per layer --------------------------------------------------------------------
    @abstractmethod
    def select(
        self,
        module: nn.Module,
        decomposer: Decomposer,
        *,
        cache: SpectralSource | None = None,
        name: str | None = None,
        options: Mapping[str, Any] | None = None,
        **params: Any,
    ) -> tuple[int, ...]:
        """Ranks for ``decomposer`` on ``module`` (a tuple in the decomposer's order).

        ``name`` is the layer's qualified name (for per-layer overrides); ``options``
        the decomposer options of this layer (default: the decomposer's
        ``default_options(module)``).
        """

    # -- model-wide ---------------------------------------------------------------------
    def select_layers(
        self,
        model: nn.Module,
        layers: Sequence[LayerInfo],
        decomposers: Mapping[str, Decomposer],
        *,
        cache: SpectralSource | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        input_shape: Sequence[int] | None = None,
        **params: Any,
    ) -> list[LayerChoice]:
        """A :class:`LayerChoice` for every layer in ``layers`` (each has a decomposer).

        The base implementation calls :meth:`select` per layer; global selectors
        override it. ``options`` maps a layer name to its decomposer options;
        ``input_shape`` (batch included) is the model's input, for selectors that
        weigh FLOPs of the whole model.
        """
        options = options or {}
        out = []
        for layer in layers:
            dec = decomposers[layer.name]
            module = model.get_submodule(layer.name)
            opts = dict(options.get(layer.name) or {})
            ranks = self.select(module, dec, cache=cache, name=layer.name, options=opts, **params)
            out.append(LayerChoice(layer.name, dec.name, tuple(ranks), "", opts))
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class CheckedRankSelector(RankSelector):
    """A per-layer selector whose :meth:`select` checks its parameters first.

    Subclasses implement :meth:`select_checked`, which receives the validated
    parameters (``validate_params(params)``) instead of the raw keyword arguments.
    """

    #: whether :meth:`select` fills ``options=None`` with ``decomposer.default_options(module)``
    fill_default_options: ClassVar[bool] = True

    def select(self, module: nn.Module, decomposer: Decomposer, *, cache: SpectralSource | None = None,
               name: str | None = None, options: Mapping[str, Any] | None = None, **params: Any) -> tuple[int, ...]:
        checked = self.validate_params(params)
        if options is None and self.fill_default_options:
            options = decomposer.default_options(module)
        return self.select_checked(module, decomposer, checked, cache=cache, name=name, options=options)

    @abstractmethod
    def select_checked(
        self, module: nn.Module, decomposer: Decomposer, params: dict[str, Any], *,
        cache: SpectralSource | None, name: str | None, options: Mapping[str, Any] | None,
    ) -> tuple[int, ...]:
        """Ranks for ``decomposer`` on ``module`` from the checked ``params`` (``options``
        is None only when the caller gave none and :attr:`fill_default_options` is off)."""
