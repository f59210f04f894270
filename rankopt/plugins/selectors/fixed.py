"""Fixed ranks or fractions of each layer's largest ranks, with per-layer overrides."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn as nn
from optuna.distributions import BaseDistribution, FloatDistribution
from pydantic import Field, field_validator

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.contract.decomposer import Decomposer
from rankopt.contract.selector import CheckedRankSelector, SelectorParams, ceil_fraction, clamp_ranks
from rankopt.core.records import RankSelectorInfo
from rankopt.compression.spectral import SpectralCache
from rankopt.compression.surgery import LayerInfo

__all__ = ["FixedRankSelector", "FixedParams", "PER_LAYER_PREFIX"]

# flat parameter names of the per-layer search space: "fraction:layer1.0.conv1"
# (no "/" or ".": Ray Tune flattens nested configs on those)
PER_LAYER_PREFIX = "fraction:"
# the search space's smallest fraction: rank 1 of layers up to 1000 wide (a per-layer
# reduction of 64x and beyond); log scale, so each factor of 2 gets the same share
MIN_FRACTION = 0.001


class FixedParams(SelectorParams):
    """``fraction`` in (0, 1]: every rank is ``ceil(fraction * largest)``;
    ``fractions``: ``{glob pattern: fraction}`` overrides; ``ranks``:
    ``{glob pattern: [r1, r2, ...]}`` explicit ranks; ``min_rank``: the floor."""

    fraction: float = Field(0.5, gt=0.0, le=1.0)
    fractions: dict[str, float] = Field(default_factory=dict)
    ranks: dict[str, list[int]] = Field(default_factory=dict)
    min_rank: int = Field(1, ge=1)

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, f in value.items():
            if not 0.0 < f <= 1.0:
                raise ValueError(f"fractions[{pattern!r}] must be a number in (0, 1], got {f!r}")
        return value

    @field_validator("ranks")
    @classmethod
    def _ranks_positive(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        for pattern, ranks in value.items():
            if not ranks or any(r < 1 for r in ranks):
                raise ValueError(
                    f"ranks[{pattern!r}] must be a non-empty list of integers >= 1, got {ranks!r}"
                )
        return value


def _first_match(name: str | None, table: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The exact entry for ``name``, else the first glob pattern (in order) matching it."""
    if name is None:
        return None
    if name in table:
        return name, table[name]
    for pattern, value in table.items():
        if fnmatch.fnmatchcase(name, pattern):
            return pattern, value
    return None


class FixedRankSelector(CheckedRankSelector):
    """Explicit ranks, or a fraction of each layer's largest ranks.

    For a layer named ``name`` the first rule that applies wins: an entry of ``ranks``
    (the exact name, else the first glob pattern in order that matches), then one of
    ``fractions`` (same matching), then ``fraction``. Fractions round up
    (``ceil(fraction * largest)``), so every rank keeps at least that share. Ranks
    are clamped to ``[min_rank, largest]``; explicit ranks must have as many entries
    as the decomposer's ranks.

    Search space: one ``fraction`` for all layers, or with ``per_layer=True`` one
    ``fraction:<layer name>`` per layer (accepted back by :meth:`validate_params`
    as entries of ``fractions``).
    """

    name = "fixed"
    description = "Explicit ranks or fractions of each layer's largest ranks, per-layer glob overrides"
    Params = FixedParams

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(params, Mapping) and any(str(k).startswith(PER_LAYER_PREFIX) for k in params):
            params = dict(params)
            fractions = dict(params.get("fractions") or {})
            for key in [k for k in params if str(k).startswith(PER_LAYER_PREFIX)]:
                fractions[str(key)[len(PER_LAYER_PREFIX):]] = params.pop(key)
            params["fractions"] = fractions
        return super().validate_params(params)

    def select_checked(
        self, module: nn.Module, decomposer: Decomposer, checked: dict[str, Any], *,
        cache: SpectralCache | None, name: str | None, options: Mapping[str, Any] | None,
    ) -> tuple[int, ...]:
        largest = decomposer.max_ranks(module, options or None)
        explicit = _first_match(name, checked["ranks"])
        if explicit is not None:
            pattern, ranks = explicit
            if len(ranks) != len(largest):
                raise ConfigError(
                    f"rank selector 'fixed': ranks[{pattern!r}] = {ranks} for layer {name!r} must have "
                    f"{len(largest)} entries {list(decomposer.rank_names) or ''} for decomposer "
                    f"{decomposer.name!r} (largest ranks {list(largest)})"
                )
            return clamp_ranks(ranks, largest, checked["min_rank"])
        override = _first_match(name, checked["fractions"])
        fraction = override[1] if override is not None else checked["fraction"]
        return clamp_ranks([ceil_fraction(fraction, hi) for hi in largest], largest, checked["min_rank"])

    def search_space(
        self, layers: Sequence[LayerInfo] = (), *, per_layer: bool = False, **options: Any
    ) -> dict[str, BaseDistribution]:
        self._reject_space_options(options, ("per_layer",))
        if per_layer:
            return {f"{PER_LAYER_PREFIX}{layer.name}": FloatDistribution(MIN_FRACTION, 1.0, log=True)
                    for layer in layers}
        return {"fraction": FloatDistribution(MIN_FRACTION, 1.0, log=True)}


@hookimpl
def rankopt_rank_selectors() -> list[RankSelectorInfo]:
    return [RankSelectorInfo("fixed", FixedRankSelector, FixedRankSelector.description)]
