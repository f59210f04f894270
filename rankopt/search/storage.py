"""The Optuna storage of a study, the run lock, and recovery of trials a dead process left.

SQLite in the run directory by default (one machine); any Optuna RDB URL
(``postgresql://...``) lets several machines share a study. Rerunning a study
continues it: trials left RUNNING by a process that died are marked FAIL (so they are
neither counted as done nor left dangling) and rerun.

* With the default SQLite file, a lock file in the run directory says which process
  runs the study; when that process is gone, every RUNNING trial is stale.
* With a shared RDB, other machines may be running trials right now, so staleness
  comes from Optuna's heartbeats instead (``heartbeat_interval``/``grace_period``).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import TracebackType

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from rankopt.errors import ConfigError

__all__ = [
    "DB_FILE",
    "default_storage_url",
    "is_local_sqlite",
    "open_storage",
    "fail_stale_trials",
    "RunLock",
]

DB_FILE = "optuna.db"
HEARTBEAT_INTERVAL = 60
GRACE_PERIOD = 180


def default_storage_url(run_dir: Path) -> str:
    return f"sqlite:///{(Path(run_dir) / DB_FILE).resolve()}"


def is_local_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def open_storage(url: str) -> BaseStorage:
    """An Optuna RDB storage for ``url`` (SQLite waits on locks; shared RDBs send heartbeats)."""
    try:
        if is_local_sqlite(url):
            # concurrent writers (threads, the Ray driver) wait instead of failing at once
            return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD)
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigError(
            f"storage: the driver for {url.split(':', 1)[0]!r} is not installed ({exc}); for "
            "PostgreSQL install the 'postgres' extra: pip install 'rankopt[postgres]'"
        ) from None
    except Exception as exc:  # SQLAlchemy's errors for a bad URL or an unreachable server
        raise ConfigError(
            f"storage: cannot open {_redact(url)!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "give an Optuna RDB URL such as sqlite:///path/optuna.db or "
            "postgresql://user@host/db"
        ) from None


def _redact(url: str) -> str:
    # never echo a password from a database URL
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def fail_stale_trials(study: optuna.Study, storage: BaseStorage, *, all_running: bool) -> list[int]:
    """Mark trials a dead process left RUNNING as FAIL; returns their numbers.

    ``all_running``: every RUNNING trial is stale (the run lock proved no live process
    owns the study); otherwise Optuna's heartbeat rule decides.
    """
    if not all_running:
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        return sorted(before - after)
    failed = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "fail_reason", "left running by a process that died")
        if storage.set_trial_state_values(trial_id, TrialState.FAIL):
            failed.append(trial.number)
    return failed


class RunLock:
    """``RUN_DIR/run.lock``: one live process per run directory (on one machine).

    Taking a lock held by a live process is a :class:`ConfigError`; a lock whose
    process is gone (crashed, killed) is taken over, and :attr:`took_over` says so.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "run.lock"
        self.took_over = False

    def _holder(self) -> dict[str, object] | None:
        try:
            return json.loads(self.path.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        holder = self._holder()
        if holder is not None:
            pid = int(holder.get("pid", -1))  # type: ignore[arg-type]
            same_host = holder.get("host") == socket.gethostname()
            if same_host and pid != os.getpid() and _alive(pid):
                raise ConfigError(
                    f"run directory {str(self.path.parent)!r} is in use by process {pid} on this "
                    "machine; wait for it to finish, or use another --run-dir"
                )
            self.took_over = True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))

    def release(self) -> None:
        holder = self._holder()
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
