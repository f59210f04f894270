"""The Optuna storage of a study, the run lock, and recovery of trials a dead process left.

SQLite in the run directory by default (one machine); any Optuna RDB URL
(``postgresql://...``) lets several machines share a study. Rerunning a study
continues it: trials left RUNNING by a process that died are marked FAIL (so they are
neither counted as done nor left dangling) and rerun.

* Every trial records the process running it (user attr ``worker``, ``host:pid``); a
  RUNNING trial whose process on this machine is gone is stale.
* With a shared RDB, other machines may be running trials right now, so staleness of
  their trials comes from Optuna's heartbeats (``heartbeat_interval``/``grace_period``).
* Several processes may run one study at once (see :class:`RunLock`, :class:`TrialClaim`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from pathlib import Path
from types import TracebackType

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState

from rankopt.core.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: threads of one process are still exclusive
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DB_FILE",
    "default_storage_url",
    "is_local_sqlite",
    "open_storage",
    "fail_stale_trials",
    "RunLock",
    "TrialClaim",
    "worker_id",
    "WORKER_ATTR",
    "is_surplus",
    "worth_waiting",
    "WITHDRAWN_REASON",
]

DB_FILE = "optuna.db"


def _seconds_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}: {raw!r} is not a whole number of seconds >= 1; unset it "
                          f"or give e.g. {name}={default}")
    return int(raw)


# Optuna's heartbeat on shared RDB storages: a running trial whose process (or Ray driver)
# has not beaten for GRACE_PERIOD seconds is failed by any other process on the study
HEARTBEAT_INTERVAL = _seconds_from_env("RANKOPT_HEARTBEAT_INTERVAL", 60)
GRACE_PERIOD = _seconds_from_env("RANKOPT_GRACE_PERIOD", 180)


def default_storage_url(run_dir: Path) -> str:
    """``sqlite:///RUN_DIR/optuna.db``, built by SQLAlchemy so that ``?``, ``%`` or ``#`` in
    the path are escaped (pasted into the URL they would start a query or put the
    database elsewhere)."""
    from sqlalchemy.engine import URL

    path = str((Path(run_dir) / DB_FILE).resolve())
    return URL.create("sqlite", database=path).render_as_string(hide_password=False)


def is_local_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def open_storage(url: str) -> BaseStorage:
    """An Optuna RDB storage for ``url`` (SQLite waits on locks; shared RDBs send heartbeats).
    A PostgreSQL URL runs with whichever driver is installed (see ``storage_url``)."""
    from rankopt.search.storage_url import normalize_storage_url

    url = normalize_storage_url(url)
    try:
        if is_local_sqlite(url):
            # concurrent writers (threads, the Ray driver) wait instead of failing at once
            return RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        return _open_shared(url)
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigError(
            f"storage: the driver for {url.split(':', 1)[0]!r} is not installed ({exc}); for "
            "PostgreSQL install the 'postgres' extra: pip install 'rankopt[postgres]'"
        ) from None
    except Exception as exc:  # SQLAlchemy's errors for a bad URL or an unreachable server
        from rankopt.core.safe_paths import disk_full_error, disk_full_in

        if disk_full_in(exc) and is_local_sqlite(url):
            raise disk_full_error(url.split("sqlite:///", 1)[-1]) from None
        raise ConfigError(
            f"storage: cannot open {_redact(url)!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "give an Optuna RDB URL such as sqlite:///path/optuna.db or "
            "postgresql://user@host/db"
        ) from None


def _open_shared(url: str, attempts: int = 5) -> RDBStorage:
    """A shared RDB storage with heartbeats. Workers that open a new database at the same
    moment race to create Optuna's tables; the loser's duplicate-object error is retried,
    and then finds the tables there."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _redact(url: str) -> str:
    # never echo a password from a database URL
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


WORKER_ATTR = "worker"
STALE_REASON = "left running by a process that died"
HEARTBEAT_REASON = (
    f"worker died: no heartbeat from its process for over {GRACE_PERIOD} s (the process or "
    "its machine stopped)"
)


def worker_id() -> str:
    """``host:pid:start:boot:pidns`` of this process, stored on every trial it runs (user
    attr ``worker``). ``start``: its start time in clock ticks since boot (tells a process
    from a later one that reuses its PID: a restarted container is PID 1 again); ``boot``:
    the kernel's boot id; ``pidns``: the inode of its PID namespace. Two containers with
    one hostname (``--uts=host``) on one volume differ in ``pidns``: a PID means nothing
    across PID namespaces, so there only heartbeats tell whether a worker lives."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or 0}:{_boot_id()}:{_pid_namespace()}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace(":", "")
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    """A process's start time (``/proc/<pid>/stat`` field 22); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def same_process_space(worker: object) -> bool:
    """True when ``worker``'s PID can be looked up from here: the same host name, and (when
    it recorded them) the same boot and the same PID namespace."""
    if not isinstance(worker, str) or ":" not in worker:
        return False
    parts = worker.split(":")
    if parts[0] != socket.gethostname():
        return False
    boot = parts[3] if len(parts) > 3 else ""
    pidns = parts[4] if len(parts) > 4 else ""
    return (not boot or boot == _boot_id()) and (not pidns or pidns == _pid_namespace())


def _dead_here(worker: object) -> bool:
    """True when ``worker`` names a process of this machine's PID space (see
    :func:`same_process_space`) that no longer exists, or whose PID now belongs to
    another process (a different start time). A worker in another PID namespace or boot
    is never judged by its PID (heartbeats decide there)."""
    if not same_process_space(worker):
        return False
    parts = str(worker).split(":")
    pid = parts[1] if len(parts) > 1 else ""
    if not pid.isdigit():
        return False
    if not _alive(int(pid)):
        return True
    if len(parts) > 2 and parts[2].isdigit() and int(parts[2]):
        now = _start_time(int(pid))
        return now is not None and now != int(parts[2])
    return False


def _heartbeat_on(storage: object) -> bool:
    """True for a storage that keeps Optuna heartbeats (a shared RDB, see open_storage)."""
    # optuna exports neither name publicly; fail_stale_trials itself uses them
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


def worth_waiting(study: optuna.Study, storage: BaseStorage, own: set[int]) -> bool:
    """With the count full but not all COMPLETE: True while a running trial may yet fail
    and need a replacement that this worker should run: one of its ``own`` (trial
    numbers), or, on a shared RDB, another process's trial whose heartbeat is late (over
    two intervals: its process may be dead, and is failed once past the grace period).
    Trials of live workers elsewhere are theirs to finish."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if any(t.number in own for t in running):
        return True
    if not _heartbeat_on(storage):
        return False
    from datetime import datetime, timedelta

    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    backend = getattr(storage, "_backend", storage)
    ids = {t._trial_id: t for t in running}
    if not ids or not hasattr(backend, "scoped_session"):
        return False
    with _create_scoped_session(backend.scoped_session) as session:
        now = session.execute(sqlalchemy_now()).scalar().replace(tzinfo=None)
        beats = {
            row.trial_id: row.heartbeat
            for row in session.query(models.TrialHeartbeatModel).filter(
                models.TrialHeartbeatModel.trial_id.in_(list(ids)))
        }
    late = timedelta(seconds=2 * HEARTBEAT_INTERVAL)
    for trial_id, trial in ids.items():
        beat = beats.get(trial_id)
        if beat is None:
            start = trial.datetime_start
            if start is None or start < datetime.now() - late:
                return True
        elif now - beat > late:
            return True
    return False


def sqlalchemy_now() -> object:
    import sqlalchemy

    return sqlalchemy.func.now()


def _never_beat(study: optuna.Study, storage: BaseStorage) -> list[int]:
    """RUNNING trials older than the grace period that never sent a heartbeat (their
    process died between asking for the trial and its first beat); Optuna's own rule
    skips trials without a heartbeat, which would leave them RUNNING for ever."""
    from datetime import datetime, timedelta

    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    cutoff = datetime.now() - timedelta(seconds=GRACE_PERIOD)
    old = {t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and t.datetime_start < cutoff}
    backend = getattr(storage, "_backend", storage)
    if not old or not hasattr(backend, "scoped_session"):
        return []
    with _create_scoped_session(backend.scoped_session) as session:
        beating = {
            row.trial_id
            for row in session.query(models.TrialHeartbeatModel).filter(
                models.TrialHeartbeatModel.trial_id.in_(old))
        }
    return sorted(old - beating)


def is_surplus(study: optuna.Study, number: int, target: int) -> bool:
    """True when trials numbered below ``number`` that are COMPLETE or RUNNING already
    make ``target``: the trial was asked by a worker that raced another one (on another
    machine) past the count. Trial numbers come from the storage, so every worker agrees
    which trial is the surplus one; it is withdrawn (PRUNED) instead of run."""
    earlier = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if t.number < number
    ]
    return len(earlier) >= target


WITHDRAWN_REASON = "withdrawn: other workers on this study had already started the trials wanted"


def fail_stale_trials(study: optuna.Study, storage: BaseStorage, *, local: bool) -> list[int]:
    """Mark trials a dead process left RUNNING as FAIL; returns their numbers.

    A RUNNING trial is stale when its ``worker`` (``host:pid:start``) is a dead process on
    this machine, or its PID now runs another process (another start time). With the
    embedded SQLite file (``local``) a RUNNING trial that names no worker is stale too (only rankopt processes on this machine use that
    file); with a shared RDB, Optuna's heartbeat rule (``HEARTBEAT_REASON``) also fails
    trials of dead processes elsewhere, and trials that never sent a heartbeat.
    Live workers' trials are never touched, so several processes can share a study.
    """
    failed = []
    study_id = storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not (_dead_here(worker) or (local and worker is None)):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, "fail_reason", STALE_REASON)
        storage.set_trial_user_attr(trial_id, "reason", STALE_REASON)
        if storage.set_trial_state_values(trial_id, TrialState.FAIL):
            failed.append(trial.number)
    if not local and _heartbeat_on(storage):
        # Optuna's own rule (optuna.storages.fail_stale_trials), with the reason recorded
        # first: a finished trial's attrs cannot be set any more
        numbers = {t._trial_id: t.number for t in study.get_trials(deepcopy=False)}
        for trial_id in [*storage._get_stale_trial_ids(study_id), *_never_beat(study, storage)]:
            try:
                storage.set_trial_user_attr(trial_id, "reason", HEARTBEAT_REASON)
                if storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    failed.append(numbers.get(trial_id, -1))
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another process failed it first
    return sorted(n for n in failed if n >= 0)


class _FileLock:
    """An exclusive ``flock`` on a file, also exclusive between this process's threads.

    ``unlink_on_release`` removes the file when done; acquiring checks that the locked
    file is still the one at the path (the usual guard against a concurrent unlink).
    """

    def __init__(self, path: Path, *, unlink_on_release: bool = False) -> None:
        self.path = Path(path)
        self.unlink_on_release = unlink_on_release
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def acquire(self) -> None:
        self._thread_lock.acquire()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                # never through a link planted at the lock's name
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self._fd = fd
                    return
                os.close(fd)
        except BaseException:
            self._thread_lock.release()
            raise

    def release(self) -> None:
        """Release (a no-op when not held, so a ``finally`` may call it again)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.unlink_on_release:
            self.path.unlink(missing_ok=True)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        self._thread_lock.release()

    def __enter__(self) -> _FileLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class RunLock(_FileLock):
    """``RUN_DIR/run.lock``: held while a process sets a study up (creates or loads it in
    the storage, fails stale trials, trains or loads the reference).

    Several processes may work on one study (``rankopt run`` twice, or on several
    machines with a shared RDB storage): the lock only makes the second wait until the
    first has cached the reference, which it then loads instead of training it again.
    A lock left by a killed process is released by the kernel with the process.
    """

    def __init__(self, run_dir: Path) -> None:
        super().__init__(Path(run_dir) / "run.lock", unlink_on_release=True)


class TrialClaim(_FileLock):
    """``RUN_DIR/.claim.lock``: taken from "is a trial still wanted?" until the new trial is
    RUNNING with its worker recorded, so concurrent workers on one machine never start
    more trials than the study wants, and stale-trial recovery never sees a half-started
    trial. (Workers on other machines share no file: there, at most one trial per extra
    machine can run beyond ``trials``.)"""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(Path(run_dir) / ".claim.lock")


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
