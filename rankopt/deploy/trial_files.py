"""Trial files bound to their trial: ``trials/N/model.pt`` must be trial N's of this study.

Every trial file's metadata names its study and trial, and the file holds its spec;
``pick``, ``evaluate`` and ``export`` compare all three with the storage before trusting
the file, so a file copied from another trial, run or study is refused instead of being
reported (or shipped) under the wrong numbers. Test accuracies cached in
``evaluation.json`` are keyed by the SHA-256 of the file's bytes (:func:`file_digest`),
so a replaced file is measured again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rankopt.core.errors import ArtifactError

__all__ = ["check_trial_file", "file_digest", "spec_summary"]


def file_digest(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 of a file's bytes (read in blocks), or None when it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def spec_summary(spec: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Layer -> (decomposer, ranks): what a spec and a trial's stored ranks share."""
    out = {}
    for name, entry in (spec or {}).items():
        if not isinstance(entry, Mapping):
            return {"<malformed>": ("", ())}
        ranks = entry.get("ranks")
        ranks = [ranks] if isinstance(ranks, int) else list(ranks or [])
        out[str(name)] = (str(entry.get("decomposer", "")), tuple(int(r) for r in ranks))
    return out


def check_trial_file(payload: Mapping[str, Any], path: str | os.PathLike[str], *, study: str, trial: int,
                     spec: Mapping[str, Any], allow_unchecked: bool = False) -> None:
    """Refuse ``payload`` (read from ``path``) unless its metadata names ``study`` and
    ``trial`` and it holds ``spec``; a file written before trial files carried their
    study and trial passes with ``allow_unchecked`` only."""
    where = f"model file {str(Path(path))!r}"
    metadata = payload.get("metadata") or {}
    if "study" not in metadata or "trial" not in metadata:
        if allow_unchecked:
            import warnings

            warnings.warn(f"{where} does not say which study and trial wrote it: used as trial {trial} "
                          "unchecked (allow_unchecked=True)", UserWarning, stacklevel=2)
            return
        raise ArtifactError(
            f"{where} does not say which study and trial wrote it, so it cannot be checked to be "
            f"trial {trial} of study {study!r}; pick it again from its own run, or pass "
            "--allow-unchecked (allow_unchecked=True) if you trust it"
        )
    found_study, found_trial = metadata.get("study"), metadata.get("trial")
    if found_study != study or found_trial != trial:
        raise ArtifactError(
            f"{where} is not trial {trial} of study {study!r}: it was written by trial {found_trial!r} "
            f"of study {found_study!r} (copied or moved there); refusing to report or copy it "
            "under this trial's numbers"
        )
    if spec_summary(payload.get("spec") or {}) != spec_summary(spec):
        raise ArtifactError(
            f"{where} holds another compression than trial {trial} recorded in the storage "
            "(layers, decomposers or ranks differ); refusing to report or copy it under this "
            "trial's numbers"
        )
