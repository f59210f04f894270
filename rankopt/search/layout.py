"""The run directory's fixed names and its atomic JSON writes, below every search module
(the results layer reads the same names)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rankopt.config.schema import StudyConfig
from rankopt.core.safe_paths import atomic_write_text
from rankopt.search.repeats import jsonable

__all__ = ["STUDY_FILE", "LEGACY_STUDY_FILE", "reference_path", "storage_url_of", "write_json"]

# the run's own record of the resolved config: not "study.yaml", the usual name of a user's
# study file, which `rankopt run study.yaml --run-dir .` would otherwise overwrite
STUDY_FILE = "resolved-study.yaml"
LEGACY_STUDY_FILE = "study.yaml"  # read from run directories written before


def reference_path(run_dir: Path) -> Path:
    return Path(run_dir) / "reference" / "metrics.json"


def storage_url_of(config: StudyConfig, run_dir: Path) -> str:
    from rankopt.search.storage import default_storage_url

    return config.storage or default_storage_url(run_dir)


def write_json(path: Path, data: Mapping[str, Any], *, root: Path | None = None) -> None:
    """Write ``data`` as JSON atomically (readers never see half a file). With ``root``
    (default: the run directory two levels up for ``trials/<n>/x``, else the parent), no
    link on the way is followed (:mod:`rankopt.core.safe_paths`)."""
    path = Path(path)
    if root is None:
        root = _run_dir_of(path)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=jsonable), root=root)


def _run_dir_of(path: Path) -> Path:
    """The run directory a run's file lies in: ``RUN/trials/<n>/f`` and ``RUN/reference/f``."""
    parent = path.parent
    if parent.parent.name == "trials" and parent.name.isdigit():
        return parent.parent.parent
    if parent.name in ("reference", "trials", "cache"):
        return parent.parent
    return parent
