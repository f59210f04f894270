"""The decomposer checks that concern refusals and the seams to rank selectors.

Split from :mod:`rankopt.testing.decomposers` to keep modules small: which layers a
decomposer refuses (and why), and its ``rank_matrices`` called the way the spectral
selectors call them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from rankopt.core.errors import UnsupportedModuleError
from rankopt.contract.decomposer import Decomposer
from rankopt.testing._core import CheckFailed, Checks, require
from rankopt.testing.samples import SampleLayer, unsupported_probes

__all__ = [
    "provides_rank_matrices",
    "rank_matrices_like_selectors",
    "why_unsupported",
    "check_refusals",
    "supports",
    "refuses_unsupported",
]


def provides_rank_matrices(dec: Decomposer) -> bool:
    return type(dec).rank_matrices is not Decomposer.rank_matrices


def rank_matrices_like_selectors(dec: Decomposer, layer: SampleLayer, top: tuple[int, ...]) -> str | None:
    """Call ``rank_matrices`` and ``ranks_from_matrix_ranks`` exactly as the spectral
    selectors do (options passed positionally), then run the ``energy`` selector."""
    from rankopt.plugins.selectors.energy import EnergyRankSelector
    from rankopt.compression.spectral import SpectralCache

    options = dec.default_options(layer.module) or None
    weight = layer.module.weight.detach()  # type: ignore[union-attr]
    try:
        mats = dec.rank_matrices(weight, options)
    except NotImplementedError:
        return "rank_matrices() raised NotImplementedError for this layer (spectral selectors refuse it)"
    except TypeError as exc:
        raise CheckFailed(
            f"rank_matrices(weight, options) raised TypeError: {exc}; rank selectors pass the "
            "layer's options, so declare rank_matrices(self, weight, options=None)"
        ) from None
    require(isinstance(mats, (list, tuple)) and len(mats) >= 1, "rank_matrices() must return a non-empty list")
    require(all(isinstance(m, torch.Tensor) and m.dim() == 2 for m in mats), "rank matrices must be 2-D tensors")
    cache = SpectralCache()
    for m in mats:
        require(bool(torch.isfinite(cache.singular_values(m)).all()), "a rank matrix has non-finite singular values")
    for matrix_ranks in ([min(m.shape) for m in mats], [1] * len(mats)):
        try:
            ranks = dec.ranks_from_matrix_ranks(layer.module, matrix_ranks, options)
        except TypeError as exc:
            raise CheckFailed(
                f"ranks_from_matrix_ranks(module, matrix_ranks, options) raised TypeError: {exc}; "
                "rank selectors pass the layer's options, so declare "
                "ranks_from_matrix_ranks(self, module, matrix_ranks, options=None)"
            ) from None
        require(
            len(ranks) == len(top) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks),
            f"ranks_from_matrix_ranks(.., {matrix_ranks}, ..) gave {ranks!r}; need {len(top)} positive ints",
        )
    picked = EnergyRankSelector().select(layer.module, dec, cache=cache, name=layer.name)
    dec.check_ranks(layer.module, picked, options=options)
    return f"{len(mats)} matri{'x' if len(mats) == 1 else 'ces'}; energy selects {picked}"


def why_unsupported(dec: Decomposer, module: nn.Module) -> str:
    try:
        reason = dec.unsupported_reason(module)
    except Exception as exc:
        return f"supports() rejects it (unsupported_reason raised {type(exc).__name__}: {exc})"
    return f"supports() rejects it: {reason}" if reason else "supports() rejects it (unsupported_reason gives no reason)"


def check_refusals(
    checks: Checks, dec: Decomposer, extra: Sequence[nn.Module] | Mapping[str, nn.Module] | None
) -> None:
    """The layers the author declared this decomposer must refuse, each with a reason."""
    declared: dict[str, nn.Module] = {}
    try:
        declared.update(dec.contract_refusals() if hasattr(dec, "contract_refusals") else {})
    except Exception as exc:
        checks.fail("declared_refusals", f"contract_refusals() raised {type(exc).__name__}: {exc}")
        return
    if isinstance(extra, Mapping):
        declared.update({str(k): v for k, v in extra.items()})
    elif extra is not None:
        declared.update({f"{type(m).__name__.lower()}_{i}": m for i, m in enumerate(extra)})
    if not declared:
        checks.skip("declared_refusals", "none declared (list layers this decomposer must refuse in contract_refusals())")
        return

    def run() -> str:
        problems = []
        for name, module in declared.items():
            try:
                reason = dec.unsupported_reason(module)
                require(not dec.supports(module), "supports() accepts it")
                require(bool(reason), "unsupported_reason() gives no reason")
                for what, call in (
                    ("check_module", lambda m: dec.check_module(m)),
                    ("max_ranks", lambda m: dec.max_ranks(m)),
                    ("build", lambda m: dec.build(m, (1,) * max(1, len(dec.rank_names)))),
                ):
                    try:
                        call(module)
                    except UnsupportedModuleError as exc:
                        require(str(reason) in str(exc), f"{what}() raised UnsupportedModuleError without the reason {reason!r}: {exc}")
                        continue
                    except CheckFailed:
                        raise
                    except Exception as exc:
                        raise CheckFailed(f"{what}() raised {type(exc).__name__} instead of UnsupportedModuleError: {exc}") from None
                    raise CheckFailed(f"{what}() accepted it")
            except CheckFailed as exc:
                problems.append(f"{name}: {exc}")
            except Exception as exc:
                problems.append(f"{name}: raised {type(exc).__name__}: {exc}")
        if problems:
            raise CheckFailed("; ".join(problems))
        return f"refused {sorted(declared)} with a reason"

    checks.run("declared_refusals", run)


def supports(dec: Decomposer, module: nn.Module) -> bool:
    try:
        return bool(dec.supports(module))
    except Exception:
        return False


def refuses_unsupported(dec: Decomposer) -> Callable[[], str]:
    def run() -> str:
        probes = [p for p in unsupported_probes() if not supports(dec, p.module)]
        require(bool(probes), "supports() accepted every probe, even BatchNorm2d and grouped convs")
        for probe in probes:
            for what, call in (
                ("check_module", lambda m: dec.check_module(m)),
                ("max_ranks", lambda m: dec.max_ranks(m)),
                ("build", lambda m: dec.build(m, (1,) * max(1, len(dec.rank_names)))),
            ):
                try:
                    call(probe.module)
                except UnsupportedModuleError:
                    continue
                except Exception as exc:
                    raise CheckFailed(
                        f"{what}({probe.name}) raised {type(exc).__name__} instead of UnsupportedModuleError: {exc}"
                    ) from None
                raise CheckFailed(f"{what}({probe.name}) accepted a module that supports() rejects")
        return f"refused {[p.name for p in probes]}"

    return run
