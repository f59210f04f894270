"""What a trial means, and the check that a continued run keeps it.

A run directory's trials are comparable only while everything that decides what a trial
trains and measures stays the same. Continuing a run with another fine-tune epochs, data
or objective would add trials of another meaning to the same front, so it is refused
before anything is written; settings that only say how many trials run, where or how
they are proposed, may change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MEANING_KEYS", "meaning_changes", "describe_changes"]

# the config keys that decide what a trial trains and measures (what a front compares)
MEANING_KEYS: tuple[str, ...] = (
    "name", "model", "data", "reference", "targets", "decomposers", "selectors", "strategies",
    "objectives", "constraints", "seed", "train", "keep_faster_layers", "latency",
    "rank_multiple", "multi_fidelity",
)
# free to change when continuing (listed for the docs; everything not in MEANING_KEYS):
# trials, timeout, max_concurrent, max_failures, backend, address, resources, storage,
# artifacts, run_dir, device, sampler, enqueue, seed_proposals, screening, skip_repeats
_IGNORED = {("model", "path")}  # where the module was found, not what it builds
_MISSING = object()


def _diff(old: Any, new: Any, path: tuple[str, ...], out: list[tuple[str, Any, Any]]) -> None:
    """Down into mappings present on both sides; a value changed at the first level
    where the two differ in kind (a fixed value that became a range is one change)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            if (*path, str(key)) not in _IGNORED:
                _diff(old.get(key, _MISSING), new.get(key, _MISSING), (*path, str(key)), out)
    elif old != new:
        out.append((".".join(path), old, new))


def meaning_changes(recorded: Mapping[str, Any], now: Mapping[str, Any], *,
                    skip: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted key, recorded value, new value)`` for each meaning key that differs."""
    changes: list[tuple[str, Any, Any]] = []
    for key in MEANING_KEYS:
        if key not in skip:
            _diff(recorded.get(key, _MISSING), now.get(key, _MISSING), (key,), changes)
    return changes


def _short(value: Any) -> str:
    if value is _MISSING:
        return "(unset)"
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 30 else text[:27] + "..."


def describe_changes(changes: list[tuple[str, Any, Any]], limit: int = 3) -> str:
    """``"strategies.finetune.epochs 4 -> 1; seed 0 -> 1"`` (the first ``limit``)."""
    parts = [f"{key} {_short(a)} -> {_short(b)}" for key, a, b in changes[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return "; ".join(parts)
