"""The base class of decomposers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn as nn

from rankopt.core.errors import InvalidRanksError, UnsupportedModuleError
from rankopt.core.types import Cost

__all__ = ["Decomposer", "Options", "InputHW"]

Options = Mapping[str, Any] | None  # a layer's decomposer options, as the spec holds them
InputHW = Sequence[int] | None  # the spatial size of a layer's input (None for Linear)


class Decomposer(ABC):
    """Factorizes one layer at given ranks.

    Subclasses set ``name``, ``description``, ``rank_names`` (the documented order of
    the ranks tuple) and ``module_types``, and implement :meth:`max_ranks`,
    :meth:`cost`, :meth:`build` and :meth:`project`. :meth:`rank_matrices` lets rank
    selectors read the spectra that govern each rank.

    ``options`` is a JSON-serializable mapping of decomposer-specific settings that is
    stored in the compression spec (e.g. TT's channel factorization).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    rank_names: ClassVar[tuple[str, ...]] = ()
    module_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Conv2d,)
    #: relative tolerance of the full-rank equivalence check in :mod:`rankopt.testing`
    #: (iterative methods such as CP-ALS reach ~1e-4, not round-off)
    contract_rtol: ClassVar[float] = 1e-6
    #: whether ``project(project(W)) == project(W)``; False for methods that find a
    #: local optimum (CP-ALS), which the contract checks then hold to a looser test
    projection_idempotent: ClassVar[bool] = True

    # -- what it supports ---------------------------------------------------------
    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why ``module`` cannot be decomposed, or None when it can."""
        if not isinstance(module, self.module_types):
            allowed = ", ".join(t.__name__ for t in self.module_types)
            return f"{type(module).__name__} is not supported (supported: {allowed})"
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                return f"grouped/depthwise convolution (groups={module.groups}) is not supported"
            if module.padding_mode != "zeros":
                return f"padding_mode={module.padding_mode!r} is not supported (only 'zeros')"
        return None

    def supports(self, module: nn.Module) -> bool:
        return self.unsupported_reason(module) is None

    def check_module(self, module: nn.Module, *, name: str | None = None) -> None:
        reason = self.unsupported_reason(module)
        if reason is not None:
            where = f"layer {name!r}" if name else type(module).__name__
            raise UnsupportedModuleError(
                f"decomposer {self.name!r} cannot decompose {where}: {reason}; "
                "exclude the layer or choose another decomposer"
            )

    # -- ranks ---------------------------------------------------------------------
    @abstractmethod
    def max_ranks(self, module: nn.Module, options: Mapping[str, Any] | None = None) -> tuple[int, ...]:
        """The largest meaningful ranks for ``module``, in ``rank_names`` order."""

    def check_ranks(
        self,
        module: nn.Module,
        ranks: Sequence[int] | int,
        *,
        name: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[int, ...]:
        """Validate ``ranks`` for ``module``: right length, integers in [1, largest]."""
        if isinstance(ranks, int):
            ranks = (ranks,)
        ranks = tuple(ranks)
        largest = self.max_ranks(module, options)
        where = f" for layer {name!r}" if name else ""
        if len(ranks) != len(largest):
            raise InvalidRanksError(
                f"{self.name} ranks{where} must have {len(largest)} entries "
                f"{self.rank_names}, got {list(ranks)}"
            )
        for rn, r, hi in zip(self.rank_names or [f"r{i}" for i in range(len(largest))], ranks, largest):
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= hi:
                raise InvalidRanksError(
                    f"{self.name} rank {rn}{where} must be an integer in [1, {hi}], got {r!r}; "
                    f"the largest ranks of this layer are {list(largest)}"
                )
        return ranks

    # -- the work ------------------------------------------------------------------
    def cost(
        self,
        module: nn.Module,
        ranks: Sequence[int],
        input_hw: Sequence[int] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Cost:
        """Exact params and FLOPs (one sample) of the module :meth:`build` would return.

        Checks ``module`` and ``ranks`` (:meth:`check_module`, :meth:`check_ranks`), then
        calls :meth:`checked_cost`, which a decomposer implements.
        """
        self.check_module(module)
        return self.checked_cost(module, self.check_ranks(module, ranks, options=options), input_hw, options)

    def checked_cost(self, module: nn.Module, ranks: tuple[int, ...], input_hw: InputHW, options: Options) -> Cost:
        """:meth:`cost` of a supported ``module`` at valid ``ranks``."""
        raise NotImplementedError(f"decomposer {self.name!r} implements neither cost nor checked_cost")

    def build(
        self,
        module: nn.Module,
        ranks: Sequence[int],
        *,
        options: Mapping[str, Any] | None = None,
        initialize: bool = True,
    ) -> nn.Module:
        """The factorized module; from ``module``'s weights when ``initialize``, else shapes only.

        Checks ``module`` and ``ranks``, then calls :meth:`checked_build`, which a
        decomposer implements.
        """
        self.check_module(module)
        return self.checked_build(module, self.check_ranks(module, ranks, options=options), options, initialize)

    def checked_build(self, module: nn.Module, ranks: tuple[int, ...], options: Options, initialize: bool) -> nn.Module:
        """:meth:`build` of a supported ``module`` at valid ``ranks``."""
        raise NotImplementedError(f"decomposer {self.name!r} implements neither build nor checked_build")

    @abstractmethod
    def project(
        self, weight: torch.Tensor, ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> torch.Tensor:
        """The low-rank approximation of ``weight`` at ``ranks``, in ``weight``'s own shape."""

    def rank_matrices(
        self, weight: torch.Tensor, options: Mapping[str, Any] | None = None
    ) -> list[torch.Tensor]:
        """Matrices whose singular values govern each rank entry, one per :meth:`max_ranks` entry.

        Rank selectors turn each matrix's spectrum into a rank and pass the list to
        :meth:`ranks_from_matrix_ranks`.
        """
        raise NotImplementedError(f"decomposer {self.name!r} does not expose rank matrices")

    def module_rank_matrices(
        self, module: nn.Module, options: Mapping[str, Any] | None = None
    ) -> list[torch.Tensor]:
        """The rank matrices selectors read for ``module``.

        By default :meth:`rank_matrices` of its weight. Data-aware decomposers override
        it to whiten them by the module's input statistics
        (:mod:`rankopt.compression.calibration`), so that a threshold p means a share of *output*
        energy when the layer is decomposed data-aware.
        """
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise UnsupportedModuleError(
                f"rank selectors read a layer's weight, but {type(module).__name__} has no "
                "'weight' tensor; exclude the layer"
            )
        return self.rank_matrices(weight, options)

    def ranks_from_matrix_ranks(
        self, module: nn.Module, matrix_ranks: Sequence[int], options: Mapping[str, Any] | None = None
    ) -> tuple[int, ...]:
        """Combine per-matrix ranks into this decomposer's ranks (identity by default)."""
        return tuple(int(r) for r in matrix_ranks)

    def contract_refusals(self) -> dict[str, nn.Module]:
        """Layers this decomposer must refuse, by name, for :mod:`rankopt.testing` to check.

        The contract checks require each to be rejected by :meth:`supports` with a
        reason from :meth:`unsupported_reason`, and :meth:`check_module`,
        :meth:`max_ranks` and :meth:`build` to raise
        :class:`~rankopt.UnsupportedModuleError` carrying that reason. None by default.
        """
        return {}

    def default_options(self, module: nn.Module) -> dict[str, Any]:
        """Options chosen automatically for ``module`` (stored in the spec)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
