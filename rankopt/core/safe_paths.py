"""Writes and removals that never act outside a run directory.

A run directory may come from elsewhere (a colleague's archive, a shared disk), so every
entry in it is untrusted: ``trials/7`` may be a symbolic link to the user's home. Every
removal and every write under a run directory goes through this module, which

- refuses a path that leaves the run directory, lexically (``..``) or through a link: each
  component below the run directory is checked with ``lstat`` and a link is refused;
- removes a folder with :func:`shutil.rmtree`, which on this platform works on file
  descriptors and unlinks a link inside instead of following it;
- reports (never removes) a link found while clearing a folder, so that the user sees it;
- writes a file atomically: a temporary in the same folder opened with
  ``O_CREAT | O_EXCL | O_NOFOLLOW``, ``fsync``, then ``os.replace``. Nothing half-written
  appears under the final name, and a full disk raises :class:`DiskFullError` naming the
  path and the free space.

The run directory itself may be a link the user made (``runs -> /data/runs``): it is the
root, resolved once; only what lies below it is checked.

Written by hand because no library offers "rmtree/write confined to a root, refusing
links" (``shutil.rmtree`` gives the no-follow removal, which is used).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from rankopt.core.errors import DiskFullError, UnsafePathError

__all__ = [
    "check_inside",
    "is_link",
    "make_dirs",
    "remove_tree",
    "remove_file",
    "clear_dir",
    "atomic_write",
    "atomic_write_text",
    "disk_full_error",
    "disk_full_in",
    "describe_os_error",
    "RUN_DIR_ENTRIES",
    "check_layout",
    "check_output",
    "temp_beside",
    "publish",
]

# the run directory's own entries: folders, and the files a run writes at its top
RUN_DIR_FOLDERS = ("trials", "reference", "cache", "report")
RUN_DIR_FILES = ("optuna.db", "resolved-study.yaml")
RUN_DIR_ENTRIES = RUN_DIR_FOLDERS + RUN_DIR_FILES
# what an output (pick/export --out) may not overwrite without --force: a run's own files
_RUN_OWN = RUN_DIR_ENTRIES + ("study.yaml", "summary.json", "evaluation.json", "screening.json")
_SQLITE_MAGIC = b"SQLite format 3\x00"

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def is_link(path: str | os.PathLike[str]) -> bool:
    """True for a symbolic link (dangling or not); never follows it."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def _link_text(path: Path) -> str:
    try:
        return f" (a link to {os.readlink(path)!r})"
    except OSError:
        return ""


def check_inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """``path`` (absolute, or relative to the working directory) as an absolute path below the resolved
    ``root``; :class:`UnsafePathError` when it leaves ``root`` or any existing component
    below ``root`` (``path`` itself included) is a symbolic link. Missing components are
    fine (they are created later through :func:`make_dirs`)."""
    root_path = Path(os.path.abspath(root))
    real_root = Path(os.path.realpath(root))
    # relative paths are relative to the working directory, like ``root`` itself;
    # '..' is resolved lexically, and links are checked component by component below
    target = Path(os.path.abspath(path))
    rel: Path | None = None
    for base in (root_path, real_root):
        with contextlib.suppress(ValueError):
            rel = target.relative_to(base)
            break
    if rel is None:
        raise UnsafePathError(
            f"{str(path)!r} lies outside the run directory {str(root)!r}; rankopt writes and "
            "removes only inside a run directory"
        )
    current = real_root
    for part in rel.parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            break
        except NotADirectoryError:
            raise UnsafePathError(
                f"{str(current.parent)!r} in run directory {str(root)!r} is a file where a "
                "folder belongs; move it away or give a new --run-dir"
            ) from None
        if stat.S_ISLNK(mode):
            raise UnsafePathError(
                f"{str(current)!r}{_link_text(current)} is a symbolic link inside run directory "
                f"{str(root)!r}; rankopt never writes or removes through a link there: remove "
                "the link (or give a new --run-dir)"
            )
    return real_root / rel


def make_dirs(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and its missing parents below ``root``, refusing links and files
    on the way (see :func:`check_inside`). ``root`` itself is created when missing (it is
    the caller's choice, and may be a link)."""
    os.makedirs(root, exist_ok=True)
    target = check_inside(root, path)
    real_root = Path(os.path.realpath(root))
    current = real_root
    for part in target.relative_to(real_root).parts:
        current = current / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(current)
        mode = os.lstat(current).st_mode  # checked after mkdir: a link planted meanwhile
        if not stat.S_ISDIR(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "a file"
            raise UnsafePathError(
                f"{str(current)!r} in run directory {str(root)!r} is {what} where a folder "
                "belongs; move it away (rankopt does not remove it) or give a new --run-dir"
            )
    return target


def remove_tree(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Remove the folder (or file) ``path`` below ``root`` without following any link;
    a link at ``path`` is refused (:class:`UnsafePathError`). False when absent."""
    target = check_inside(root, path)
    if target == Path(os.path.realpath(root)):
        raise UnsafePathError(f"refusing to remove the run directory {str(root)!r} itself")
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        shutil.rmtree(target)  # fd-based here: links inside are unlinked, never followed
    else:
        os.unlink(target)
    return True


def remove_file(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """Remove the file ``path`` below ``root`` (a link there is refused). False when absent."""
    target = check_inside(root, path)
    try:
        os.unlink(target)
    except FileNotFoundError:
        return False
    return True


def clear_dir(root: str | os.PathLike[str], folder: str | os.PathLike[str],
              *, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove every entry of ``folder`` (below ``root``) except the names in ``keep``;
    returns the links found, which are reported, not removed (nor followed). A ``folder``
    that is itself a link raises :class:`UnsafePathError`; an absent one is left absent."""
    target = check_inside(root, folder)
    strays: list[str] = []
    try:
        entries = list(os.scandir(target))
    except FileNotFoundError:
        return strays
    for entry in entries:
        if entry.name in keep:
            continue
        if entry.is_symlink():
            strays.append(entry.path)
        elif entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
    return strays


def disk_full_error(path: str | os.PathLike[str], needed: int | None = None) -> DiskFullError:
    """The one-line error for a full disk while writing ``path``."""
    folder = Path(path).parent
    try:
        vfs = os.statvfs(folder)
        free = f"{_size(vfs.f_bavail * vfs.f_frsize)} free"
    except OSError:
        free = "free space unknown"
    want = f", about {_size(needed)} needed" if needed else ""
    return DiskFullError(
        errno.ENOSPC,
        f"no space left on the device writing {str(path)!r} ({free} in {str(folder)!r}{want}); "
        "free some space (or use a run directory on another disk) and run again: what was "
        "written before is intact and the run resumes where it stopped",
    )


def disk_full_in(exc: BaseException | None) -> bool:
    """Whether a full disk is anywhere in ``exc``'s chain: an ENOSPC ``OSError``, or
    SQLite's "database or disk is full" (which Optuna and SQLAlchemy wrap, and Optuna
    ends with ``AssertionError: Should not reach.``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "database or disk is full" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_os_error(exc: OSError) -> str:
    """One line for an ``OSError`` that reached the command line: what, where, the fix."""
    if isinstance(exc, DiskFullError):
        return str(exc)
    where = exc.filename if exc.filename is not None else "?"
    if exc.errno == errno.ENOSPC:
        return str(disk_full_error(where))
    what = exc.strerror or type(exc).__name__
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {str(where)!r}: {what}; run this command where it may write (a "
                "copy of the run directory, or a writable output path)")
    return f"{what}: {str(where)!r}"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def atomic_write(path: str | os.PathLike[str], data: bytes | Callable[[IO[bytes]], None],
                 *, root: str | os.PathLike[str] | None = None) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` through a
    temporary beside it, ``fsync`` and ``os.replace``: readers see the old file or the
    whole new one, never a part. With ``root``, ``path`` must lie below it with no link on
    the way (:func:`check_inside`) and missing folders are created there. A failed write
    leaves no temporary behind; ENOSPC becomes :class:`DiskFullError`."""
    path = Path(path)
    if root is not None:
        make_dirs(root, path.parent)
        path = check_inside(root, path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            written = f.tell()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at `path` itself, never its target
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(exc, DiskFullError):
            needed = len(data) if isinstance(data, (bytes, bytearray)) else written or None
            raise disk_full_error(path, needed) from exc
        # a writer that wraps the OSError (torch.save: "RuntimeError: ... iostream error")
        if isinstance(exc, RuntimeError) and _nearly_full(path.parent):
            raise disk_full_error(path, written or None) from exc
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a power cut
        dir_fd = os.open(path.parent, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system of ``folder`` has under ``margin`` bytes left."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def atomic_write_text(path: str | os.PathLike[str], text: str,
                      *, root: str | os.PathLike[str] | None = None) -> Path:
    """:func:`atomic_write` for text (UTF-8)."""
    return atomic_write(path, text.encode("utf-8"), root=root)


def check_layout(run_dir: str | os.PathLike[str]) -> None:
    """Refuse (:class:`UnsafePathError`, one line) a run directory whose own entries are
    links, or files where folders belong (``trials``, ``reference``, ``cache``,
    ``report``), or folders where files belong. Reads only."""
    root = Path(run_dir)
    for name in RUN_DIR_ENTRIES:
        path = root / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except NotADirectoryError:
            return  # the run directory is a file: check_run_dir says so
        if stat.S_ISLNK(mode):
            check_inside(root, path)  # raises, naming the link
        want_dir = name in RUN_DIR_FOLDERS
        if want_dir != stat.S_ISDIR(mode):
            what, belongs = ("a file", "a folder") if want_dir else ("a folder", "a file")
            raise UnsafePathError(
                f"{str(path)!r} in run directory {str(root)!r} is {what}, but {name!r} must be "
                f"{belongs}; move it away (rankopt does not remove it) or give a new --run-dir"
            )


def _is_storage(path: Path) -> bool:
    """An Optuna storage: any SQLite database (by its header), or ``optuna.db`` and its
    journal beside a run's files."""
    if path.name.startswith("optuna.db") and any(
            os.path.lexists(path.parent / name) for name in ("resolved-study.yaml", "trials")):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
    except OSError:
        return False


def _owning_run(path: Path) -> tuple[Path, str] | None:
    """The run directory whose own files ``path`` is among, and the entry (or None)."""
    for folder in path.parents:
        if (folder / "optuna.db").is_file() or (folder / "resolved-study.yaml").is_file():
            entry = path.relative_to(folder).parts[0]
            if entry in _RUN_OWN or entry.startswith("optuna.db"):
                return folder, entry
    return None


def check_output(out: str | os.PathLike[str], *, force: bool = False, option: str = "--out") -> None:
    """Refuse (:class:`UnsafePathError`) an output path among a run directory's own files
    (``optuna.db``, ``trials/``, ``reference/``, ``cache/``, its records), this run's or
    another's, unless ``force``; a storage (``optuna.db``, or any SQLite file) is refused
    even then. The path as given and the path it resolves to (through links) are both
    checked."""
    given = Path(os.path.abspath(out))
    for path in dict.fromkeys((given, Path(os.path.realpath(out)))):
        if _is_storage(path):
            raise UnsafePathError(
                f"{option}: {str(out)!r} is a study's storage ({str(path)!r}); writing a model "
                "there would destroy every trial's record, so it is refused even with --force: "
                "give another file name"
            )
        owner = _owning_run(path)
        if owner is not None and not force:
            run_dir, entry = owner
            raise UnsafePathError(
                f"{option}: {str(out)!r} lies in {entry!r} of run directory {str(run_dir)!r}, "
                "among the run's own files, which an output must not overwrite; give a path "
                "outside it (or add --force to write there anyway)"
            )


@contextlib.contextmanager
def temp_beside(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A new, unique temporary path beside ``out`` (created empty with ``O_EXCL |
    O_NOFOLLOW``, so no planted link is followed), removed on the way out unless
    :func:`publish` moved it to ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(out) from exc
        raise
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def publish(tmp: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Move the finished temporary ``tmp`` to ``out``: ``fsync`` it, rename it (a link at
    ``out`` is replaced, never followed), ``fsync`` the folder."""
    out = Path(out)
    try:
        fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(out) from exc
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(out.parent, os.O_RDONLY | _CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return out
