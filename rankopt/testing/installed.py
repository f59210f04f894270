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


def check_installed_plugins(families: Sequence[str] = CHECKED_FAMILIES) -> list[dict[str, Any]]:
    """Run the contract checks on every registered plugin of ``families``.

    Returns one row per check: ``{"family", "name", "distribution", "check",
    "passed", "reason"}``. Plugins that failed to load, names claimed twice and
    factories that raise are failed rows too, so a clean result means every
    installed plugin loads and honours its contract.
    """
    from rankopt.errors import ConfigError
    from rankopt.manager import FAMILIES, _family, get_registry

    keys = [_family(f).key for f in families]  # "decomposer" or "decomposers"; unknown ones fail
    unchecked = sorted(set(keys) - {*CHECKED_FAMILIES, "models"})
    if unchecked:
        raise ConfigError(
            f"cannot check plugin family {unchecked[0]!r}; checkable families are "
            f"{[*CHECKED_FAMILIES, 'models']}"
        )
    reg = get_registry()
    rows: list[dict[str, Any]] = []

    def add(family: str, name: str, dist: str, result: CheckResult) -> None:
        rows.append(
            {
                "family": family,
                "name": name,
                "distribution": dist,
                "check": result.check,
                "passed": bool(result.passed),
                "reason": result.reason,
            }
        )

    for failure in reg.failures:
        add(
            "plugin",
            failure.plugin,
            f"{failure.distribution} {failure.version}".strip(),
            CheckResult(f"load ({failure.stage})", False, failure.reason),
        )
    for key, name, sources in reg.conflicts():
        who = " and ".join(f"{s.plugin} ({s.distribution} {s.version})".replace(" )", ")") for s in sources)
        add(FAMILIES[key].label, name, ", ".join(s.distribution for s in sources),
            CheckResult("unique_name", False, f"claimed by {who}"))

    for key in keys:
        label = FAMILIES[key].label
        for provided in reg.provided(key):
            record, source = provided.record, provided.source
            dist = f"{source.distribution} {source.version}".strip()
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
            for result in _runner(key)(instance):
                add(label, record.name, dist, result)
    return rows
