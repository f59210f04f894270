"""Checks of a run directory before a run writes anything (a writable folder; an existing
one's study), and reconciliation of ``trials/<n>/`` with the storage after an
interruption (the storage is the truth).

A run directory belongs to one study: everything that decides what a trial means
(:data:`rankopt.search.run_meaning.MEANING_KEYS`: name, model, data, reference,
decomposers, selectors, strategies, objectives, fidelity...). A run that differs in any
of them is refused before a single byte changes, since its trials would mix with the
first study's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState

from rankopt.config.schema import StudyConfig
from rankopt.core.errors import ConfigError
from rankopt.search.layout import LEGACY_STUDY_FILE, STUDY_FILE
from rankopt.core.safe_paths import check_inside, check_layout, clear_dir, is_link

log = logging.getLogger("rankopt.study")

__all__ = ["check_run_dir", "check_existing_run_dir", "reconcile_trial_dirs", "INTERRUPTED_REASON"]

INTERRUPTED_REASON = "interrupted"
LEGACY_HEADER = "# the resolved study config"  # the first line of every record a run writes


def _recorded_config(run_dir: Path) -> dict[str, Any] | None:
    for name in (STUDY_FILE, LEGACY_STUDY_FILE):
        path = run_dir / name
        if path.is_file():
            try:
                text = path.read_text()
                if name == LEGACY_STUDY_FILE and not text.startswith(LEGACY_HEADER):
                    continue  # a user's own study.yaml, not a record written by a run
                raw = yaml.safe_load(text)
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise ConfigError(
                    f"run directory {str(run_dir)!r}: its record {name} cannot be read "
                    f"({type(exc).__name__}); give a new --run-dir"
                ) from None
            return raw if isinstance(raw, dict) else None
    return None


def check_existing_run_dir(
    config: StudyConfig, run_dir: Path, reference_key: str, *, user_model: bool
) -> None:
    """Refuse (``ConfigError``) a run whose study differs from the one already in ``run_dir``:
    another name, model, seed or objectives, or completed trials of another reference.
    Reads only; called before anything is written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    check_layout(run_dir)  # links, or files where folders belong: refused before any write
    recorded = _recorded_config(run_dir)
    if recorded is not None:
        from rankopt.search.run_meaning import describe_changes, meaning_changes

        now = config.model_dump(mode="json")
        # a Python model: the reference key below compares its weights
        skip = ("model",) if user_model or recorded.get("model") is None else ()
        changes = meaning_changes(recorded, now, skip=skip)
        # with no completed trial there is no front to mix (a run whose every trial failed
        # may be fixed and run again in place)
        done = any(m.get("state") == "COMPLETE" for m in _trial_metrics(run_dir))
        identity = [c for c in changes if c[0].split(".")[0] in ("name", "model", "seed", "objectives")]
        if changes and (done or identity):
            changes = changes if done else identity
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds trials of other settings ("
                f"{describe_changes(changes)}); they would not be comparable: give a new --run-dir "
                "(nothing was changed here)"
            )
    for metrics in _trial_metrics(run_dir):
        other = metrics.get("reference_key")
        if metrics.get("state") == "COMPLETE" and other not in (None, reference_key):
            raise ConfigError(
                f"run directory {str(run_dir)!r} holds trials of a different model, data or "
                f"reference config (reference {other}, now {reference_key}); their accuracies "
                "are not comparable: give a new --run-dir (nothing was changed in this one)"
            )


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def _trial_metrics(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    trials = run_dir / "trials"
    if not trials.is_dir():
        return out
    for folder in trials.iterdir():
        path = folder / "metrics.json"
        if folder.name.isdigit() and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict):
                out.append(data)
    return out


def reconcile_trial_dirs(study: optuna.Study, run_dir: Path) -> list[int]:
    """Make ``trials/<n>/`` agree with the storage, which is the truth: a folder whose
    ``metrics.json`` says COMPLETE (or is missing) while the storage has the trial FAIL,
    or has no such trial, is rewritten as FAIL with the storage's reason and its model
    removed. Folders of RUNNING and COMPLETE trials are left alone. Returns the numbers fixed.

    Every removal goes through :mod:`rankopt.core.safe_paths`: an entry of ``trials/`` that is
    a symbolic link (or a link inside a folder) is reported in the log and left as it is,
    never followed."""
    from rankopt.search.layout import write_json

    trials = Path(run_dir) / "trials"
    if is_link(trials):
        check_inside(run_dir, trials)  # raises, naming the link
    if not trials.is_dir():
        return []
    stored = {t.number: t for t in study.get_trials(deepcopy=False)}
    fixed = []
    for folder in sorted(trials.iterdir(), key=lambda p: p.name):
        if not folder.name.isdigit():
            continue
        if is_link(folder):
            log.warning("left %s alone: it is a symbolic link (to %r), not a trial folder; "
                        "remove it yourself", folder, os.readlink(folder))
            continue
        if not folder.is_dir():
            continue
        trial = stored.get(int(folder.name))
        if trial is not None and trial.state in (TrialState.RUNNING, TrialState.COMPLETE, TrialState.WAITING):
            continue
        path = folder / "metrics.json"
        try:
            state = json.loads(path.read_text()).get("state") if _plain_file(path) else None
        except (OSError, ValueError, AttributeError):
            state = None
        if trial is not None and state == "FAIL" and not os.path.lexists(folder / "model.pt"):
            continue  # already agrees
        reason = (trial.user_attrs.get("reason") if trial is not None else None) or INTERRUPTED_REASON
        strays = clear_dir(run_dir, folder)
        for stray in strays:
            log.warning("left %s alone: it is a symbolic link in a trial folder; remove it yourself", stray)
        if trial is None and not strays:
            os.rmdir(folder)
        elif trial is not None:
            write_json(path, {"trial": trial.number, "state": "FAIL", "reason": reason,
                              "reconciled": f"metrics.json said {state}; the storage has FAIL"})
        fixed.append(int(folder.name))
    return fixed


def _plain_file(path: Path) -> bool:
    return path.is_file() and not is_link(path)


def check_run_dir(run_dir: Path) -> None:
    """A run directory must be a directory, or creatable, and writable (checked before any
    work, so that a typo in ``--run-dir`` fails at once and creates nothing)."""
    run_dir = Path(run_dir)
    probe = run_dir
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is" if probe == run_dir else f"lies under {str(probe)!r}, which is"
        raise ConfigError(
            f"run directory {str(run_dir)!r} {what} a file, not a directory; give another "
            "--run-dir (or run_dir in the study file)"
        )
    # root passes os.access on a read-only file system's folders: ask the mount itself
    read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
    if read_only:
        raise ConfigError(
            f"run directory {str(run_dir)!r} is on a read-only file system ({str(probe)!r}); "
            "give a --run-dir on a writable one"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"run directory {str(run_dir)!r} is not writable ({str(probe)!r} does not let this "
            f"user create files); give a writable --run-dir"
        )
