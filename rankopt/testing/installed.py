"""Contract checks of every installed plugin (``rankopt plugins --check``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from rankopt.testing._core import CheckResult

__all__ = ["check_installed_plugins", "CHECKED_FAMILIES"]

CHECKED_FAMILIES: tuple[str, ...] = ("decomposers", "rank_selectors", "strategies")
"""Families checked by default. ``"models"`` may be added (each model is built and run
once, which is slow for the large torchvision ones); datasets are not checked (they
read data from disk)."""


def _model_checks(record: Any) -> list[CheckResult]:
    def body() -> CheckResult:
        net = record.factory(**dict(getattr(record, "defaults", None) or {}))
        if not isinstance(net, nn.Module):
            return CheckResult("builds", False, f"factory returned {type(net).__name__}, not an nn.Module")
        shape = getattr(record, "input_shape", None)
        if shape is None:
            return CheckResult("builds", True, "built (no input_shape declared, forward not tried)")
        net.eval()
        with torch.no_grad():
            out = net(torch.zeros(1, *shape))
        return CheckResult("builds", True, f"forward of {(1, *shape)} gives {tuple(out.shape)}")

    try:
        return [body()]
    except Exception as exc:
        return [CheckResult("builds", False, f"raised {type(exc).__name__}: {exc}")]


def _runner(family: str) -> Callable[[Any], list[CheckResult]]:
    from rankopt.testing.decomposers import check_decomposer
    from rankopt.testing.selectors import check_rank_selector
    from rankopt.testing.strategies import check_strategy

    return {
        "decomposers": check_decomposer,
        "rank_selectors": check_rank_selector,
        "strategies": check_strategy,
    }[family]


def _norm(text: str) -> str:
    return text.strip().lower().replace("_", "-")


def check_installed_plugins(
    families: Sequence[str] = CHECKED_FAMILIES,
    *,
    only: str | None = None,
    progress: Callable[[str, str, str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the contract checks on every registered plugin of ``families``.

    Args:
        families: the families to check.
        only: a plugin name or a distribution name (``rankopt-tensor-ring`` or
            ``rankopt_tensor_ring``): check only the plugins it names.
        progress: called as ``progress(family, name, distribution)`` before each
            plugin's checks (the command line prints it).

    Returns one row per check: ``{"family", "name", "distribution", "check",
    "passed", "skipped", "reason"}``. Plugins that failed to load, names claimed twice
    and factories that raise are failed rows too, so a clean result means every
    installed plugin loads and honours its contract. A rank selector is checked
    against every installed decomposer: those it claims to work with (every one, or
    those with ``rank_matrices`` when it ``needs_rank_matrices``) must get valid
    ranks, the others must be refused with a ConfigError; its ``decomposers`` row says
    which were which.
    """
    from rankopt.core.errors import ConfigError
    from rankopt.contract.manager import FAMILIES, _family, get_registry

    keys = [_family(f).key for f in families]  # "decomposer" or "decomposers"; unknown ones fail
    unchecked = sorted(set(keys) - {*CHECKED_FAMILIES, "models"})
    if unchecked:
        raise ConfigError(
            f"cannot check plugin family {unchecked[0]!r}; checkable families are "
            f"{[*CHECKED_FAMILIES, 'models']}"
        )
    reg = get_registry()

    def wanted(name: str, distribution: str) -> bool:
        return only is None or _norm(only) in (_norm(name), _norm(distribution))

    if only is not None:
        known = {n for key in keys for p in reg.provided(key) for n in (p.record.name, p.source.distribution)}
        known |= {n for f in reg.failures for n in (f.plugin, f.distribution)}
        if not any(_norm(only) == _norm(n) for n in known):
            raise ConfigError(
                f"no installed plugin or distribution is named {only!r} in the checked families "
                f"{[FAMILIES[k].label for k in keys]}; known names are {sorted(known)}"
            )
    rows: list[dict[str, Any]] = []

    def add(family: str, name: str, dist: str, result: CheckResult) -> None:
        rows.append(
            {
                "family": family,
                "name": name,
                "distribution": dist,
                "check": result.check,
                "passed": bool(result.passed),
                "skipped": bool(result.skipped),
                "reason": result.reason,
            }
        )

    for failure in reg.failures:
        if wanted(failure.plugin, failure.distribution):
            add(
                "plugin",
                failure.plugin,
                f"{failure.distribution} {failure.version}".strip(),
                CheckResult(f"load ({failure.stage})", False, failure.reason),
            )
    for key, name, sources in reg.conflicts():
        if not any(wanted(name, s.distribution) for s in sources):
            continue
        who = " and ".join(f"{s.plugin} ({s.distribution} {s.version})".replace(" )", ")") for s in sources)
        add(FAMILIES[key].label, name, ", ".join(s.distribution for s in sources),
            CheckResult("unique_name", False, f"claimed by {who}; users: uninstall one of them; "
                        f"authors: rename your {FAMILIES[key].label}"))

    for key in keys:
        label = FAMILIES[key].label
        for provided in reg.provided(key):
            record, source = provided.record, provided.source
            if not wanted(record.name, source.distribution):
                continue
            dist = f"{source.distribution} {source.version}".strip()
            if progress is not None:
                progress(label, record.name, dist)
            if key == "models":
                for result in _model_checks(record):
                    add(label, record.name, dist, result)
                continue
            try:
                instance = record.factory()
            except Exception as exc:
                add(label, record.name, dist, CheckResult("factory", False, f"raised {type(exc).__name__}: {exc}"))
                continue
            registered = getattr(instance, "name", None)
            add(label, record.name, dist, CheckResult(
                "registered_name",
                registered == record.name,
                f"instance.name is {registered!r}, registered as {record.name!r}",
            ))
            if key == "rank_selectors":
                results = _selector_checks(instance, source.distribution)
            else:
                results = _runner(key)(instance)
            for result in results:
                add(label, record.name, dist, result)
    return rows


def _installed_decomposers() -> list[tuple[Any, str]]:
    """(instance, distribution) of every uniquely named decomposer whose factory works."""
    from rankopt.contract.manager import get_registry

    reg = get_registry()
    conflicted = {name for key, name, _ in reg.conflicts() if key == "decomposers"}
    out = []
    for provided in reg.provided("decomposers"):
        if provided.record.name in conflicted:
            continue  # a conflict is reported as its own failure
        try:
            out.append((provided.record.factory(), provided.source.distribution))
        except Exception:
            continue  # reported by the decomposer's own "factory" row
    return out


def _selector_checks(selector: Any, distribution: str) -> list[CheckResult]:
    """The selector's checks with every installed decomposer, and a row naming them."""
    from rankopt.testing.selectors import _has_rank_matrices, check_rank_selector

    decs = _installed_decomposers()
    if not decs:
        return check_rank_selector(selector)  # reports that no decomposer is registered
    needs = bool(getattr(selector, "needs_rank_matrices", False))
    claimed = [d.name for d, _ in decs if not needs or _has_rank_matrices(d)]
    refused = [d.name for d, _ in decs if d.name not in claimed]
    own = [d.name for d, dist in decs if dist == distribution and distribution != "rankopt"]
    why = "it needs rank_matrices" if needs else "it claims every decomposer"
    reason = f"valid ranks expected with {claimed} ({why})"
    if refused:
        reason += f"; a ConfigError expected from {refused} (no rank_matrices)"
    if own:
        reason += f"; its own distribution's: {own}"
    return [CheckResult("decomposers", True, reason), *check_rank_selector(selector, [d for d, _ in decs])]
