"""Helpers shared by the spectrum-based selectors (vbmf, energy, approx_ratio, budget).

Every built-in selector works through the decomposer's public seams only:
``rank_matrices`` gives the matrices whose spectra govern each rank entry, the spectral
cache gives their singular values (one SVD per weight content, shared with the
decomposers), and ``ranks_from_matrix_ranks`` turns per-matrix ranks into the
decomposer's ranks (CP folds its two channel ranks into one R). So they work for any
decomposer that exposes ``rank_matrices``, third-party ones included.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from rankopt.core.errors import ConfigError
from rankopt.contract.selector import CheckedRankSelector, clamp_ranks
from rankopt.compression.spectral import SpectralCache, get_default_cache

if TYPE_CHECKING:  # pragma: no cover
    from rankopt.contract.decomposer import Decomposer

__all__ = [
    "MatrixSpectrum",
    "SpectralRankSelector",
    "layer_spectra",
    "energy_rank",
    "tail_fractions",
    "layer_weight",
    "RELATIVE_TOLERANCE",
]

# cumulative sums of float64 spectra carry rounding of this order; a threshold met up
# to it counts as met (so p = 0.95 on a spectrum that sums to exactly 95 % is exact)
RELATIVE_TOLERANCE = 1e-12


@dataclass(frozen=True)
class MatrixSpectrum:
    """The singular values (float64, descending) of one rank matrix and its shape."""

    shape: tuple[int, int]
    singular_values: np.ndarray

    @property
    def max_rank(self) -> int:
        return min(self.shape)


def layer_weight(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ConfigError(
            f"rank selectors read a layer's weight, but {type(module).__name__} has no "
            "'weight' tensor; exclude the layer"
        )
    return weight


def layer_spectra(
    module: nn.Module,
    decomposer: Decomposer,
    cache: SpectralCache | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[MatrixSpectrum]:
    """The spectra of ``decomposer.rank_matrices`` of ``module``'s weight, from the cache."""
    cache = cache if cache is not None else get_default_cache()
    try:
        layer_weight(module)
        matrices = decomposer.module_rank_matrices(module, options or None)
    except NotImplementedError as exc:
        raise ConfigError(
            f"{exc}; spectrum-based rank selectors need it (use the 'fixed' selector "
            "with this decomposer)"
        ) from None
    out = []
    for m in matrices:
        s = cache.singular_values(m).detach().cpu().double().numpy()
        out.append(MatrixSpectrum((int(m.shape[0]), int(m.shape[1])), s))
    return out


def energy_rank(singular_values: np.ndarray, p: float, energy: str = "squared") -> int:
    """The smallest rank whose retained energy is at least ``p`` of the total.

    ``energy="squared"`` sums squared singular values (Frobenius energy),
    ``"linear"`` the singular values themselves (nuclear norm). 0 for a zero matrix.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    e = s * s if energy == "squared" else np.abs(s)
    total = float(e.sum())
    if total <= 0.0 or s.size == 0:
        return 0
    cum = np.cumsum(e) / total
    return min(int(np.searchsorted(cum, p - RELATIVE_TOLERANCE, side="left")) + 1, s.size)


def tail_fractions(singular_values: np.ndarray) -> np.ndarray:
    """``t[r]``: the fraction of squared energy discarded at rank r, for r = 0..n."""
    e = np.asarray(singular_values, dtype=np.float64) ** 2
    total = float(e.sum())
    if total <= 0.0:
        return np.zeros(e.size + 1)
    kept = np.concatenate([[0.0], np.cumsum(e)])
    return np.clip((total - kept) / total, 0.0, 1.0)


class SpectralRankSelector(CheckedRankSelector):
    """A selector that applies one rule to the spectrum of each rank matrix.

    Subclasses implement :meth:`matrix_rank`; ranks are then combined by the
    decomposer and clamped to ``[min_rank, largest]``.
    """

    needs_rank_matrices = True

    def select_checked(
        self, module: nn.Module, decomposer: Decomposer, checked: dict[str, Any], *,
        cache: SpectralCache | None, name: str | None, options: Mapping[str, Any] | None,
    ) -> tuple[int, ...]:
        spectra = layer_spectra(module, decomposer, cache, options)
        matrix_ranks = self.matrix_ranks(spectra, module, decomposer, options, checked)
        return self.finish(module, decomposer, matrix_ranks, options, checked.get("min_rank", 1))

    def matrix_ranks(
        self,
        spectra: Sequence[MatrixSpectrum],
        module: nn.Module,
        decomposer: Decomposer,
        options: Mapping[str, Any] | None,
        params: Mapping[str, Any],
    ) -> list[int]:
        """One rank per rank matrix (the default applies :meth:`matrix_rank` to each)."""
        return [self.matrix_rank(sp, params) for sp in spectra]

    @abstractmethod
    def matrix_rank(self, spectrum: MatrixSpectrum, params: Mapping[str, Any]) -> int:
        """The rank this rule gives one matrix (may be 0; the floor is applied later)."""

    @staticmethod
    def finish(
        module: nn.Module,
        decomposer: Decomposer,
        matrix_ranks: Sequence[int],
        options: Mapping[str, Any] | None,
        floor: int,
    ) -> tuple[int, ...]:
        largest = decomposer.max_ranks(module, options or None)
        # decomposers combine per-matrix ranks (CP takes one R from two); give them >= 1
        ranks = decomposer.ranks_from_matrix_ranks(
            module, [max(1, int(r)) for r in matrix_ranks], options or None
        )
        return clamp_ranks(ranks, largest, floor)
