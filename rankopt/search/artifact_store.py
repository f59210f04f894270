"""The artifact store: where trial folders and the reference weights meet across machines.

A study file's ``artifacts:`` names any fsspec URL every machine reaches (``s3://bucket/x``,
``gs://...``, ``sftp://host/path``, or a folder on a shared mount such as NFS). A trial
uploads its folder (``model.pt``, then ``metrics.json``, so a folder with metrics is whole)
to ``<artifacts>/<study>/trials/<n>/`` from wherever it ran; the driver materializes it
under ``RUN_DIR/trials/<n>/``, and ``pick``/``report``/``load_model`` fetch it when the
local copy is absent (a trial another driver ran on a shared PostgreSQL study). The
reference goes to ``<artifacts>/<study>/reference/`` once, with the SHA-256 of its
weights file, which every trial checks before compressing.

fsspec does the transport (no copy loop of ours); the store is addressed by URL and
study name only, so it pickles into Ray workers.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

from rankopt.config.checks import check_artifacts_url
from rankopt.core.errors import ArtifactError, ConfigError

__all__ = ["ArtifactStore", "file_sha256", "check_artifacts_url", "TRIAL_FILES"]

# fsspec protocols that cannot persist a run's files beyond this process
# metrics.json last: its presence in the store means the folder is complete
TRIAL_FILES = ("model.pt", "metrics.json")
REFERENCE_FILES = ("model.pt", "metrics.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ArtifactStore:
    """``<url>/<study>/`` on an fsspec file system (see the module doc)."""

    def __init__(self, url: str, study: str) -> None:
        self.url = url
        self.study = study
        self._fs: Any = None
        self._root = ""

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "study": self.study, "_fs": None, "_root": ""}

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            self._fs, root = fsspec.core.url_to_fs(self.url)
            self._root = f"{root.rstrip('/')}/{self.study}"
        return self._fs

    def _path(self, *parts: str) -> str:
        self.fs  # noqa: B018 - sets _root
        return "/".join([self._root, *parts])

    def describe(self, *parts: str) -> str:
        return "/".join([self.url.rstrip("/"), self.study, *parts])

    def probe(self) -> None:
        """Write, read back and delete a marker under ``<url>/<study>/``; a
        :class:`ConfigError` (one line) when any step fails. Called before a run writes
        anything, so that a store nobody can use fails before the run directory exists."""
        marker = f".rankopt-probe-{uuid.uuid4().hex}"
        payload = marker.encode()
        step = "reach"
        try:
            fs = self.fs
            remote = self._path(marker)
            step = "create a folder in"
            fs.makedirs(self._path(), exist_ok=True)
            step = "write to"
            fs.pipe_file(remote, payload)
            step = "read from"
            back = fs.cat_file(remote)
            step = "delete from"
            fs.rm_file(remote)
        except Exception as exc:  # noqa: BLE001 - any transport failure is the user's to fix
            text = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ConfigError(
                f"artifacts: cannot {step} {self.describe()!r} ({type(exc).__name__}: {text}); "
                "give a URL or shared folder this machine can write (checked before the run "
                "directory was created: nothing was written)"
            ) from None
        if back != payload:
            raise ConfigError(
                f"artifacts: {self.describe()!r} gave back other bytes than were written to "
                f"{marker!r}; give a store that keeps what it is given"
            )

    # -- folders --------------------------------------------------------------------------
    def _put(self, local: Path, remote: str, names: tuple[str, ...]) -> None:
        fs = self.fs
        fs.makedirs(remote, exist_ok=True)
        for name in names:
            src = local / name
            if src.is_file():
                # a temporary name, then a rename: readers never see half a file
                tmp = f"{remote}/.{name}.{uuid.uuid4().hex}"
                fs.put_file(str(src), tmp)
                fs.mv(tmp, f"{remote}/{name}")

    def _get(self, remote: str, local: Path, names: tuple[str, ...], root: Path) -> bool:
        """Copy ``remote``'s files into ``local`` (below the run directory ``root``, no link
        on the way: :mod:`rankopt.core.safe_paths`), each through a temporary and a rename."""
        from rankopt.core.safe_paths import check_inside, make_dirs, publish, temp_beside

        fs = self.fs
        if not fs.exists(f"{remote}/metrics.json"):
            return False
        make_dirs(root, local)
        for name in names:
            if fs.exists(f"{remote}/{name}"):
                final = check_inside(root, local / name)
                with temp_beside(final) as tmp:
                    fs.get_file(f"{remote}/{name}", str(tmp))
                    publish(tmp, final)
        return True

    def put_trial(self, number: int, local: Path) -> None:
        self._put(local, self._path("trials", str(number)), TRIAL_FILES)

    def fetch_trial(self, number: int, local: Path) -> bool:
        """Copy trial ``number``'s folder into ``local``; False when the store lacks it."""
        try:
            return self._get(self._path("trials", str(number)), local, TRIAL_FILES, Path(local).parent.parent)
        except OSError as exc:
            raise ArtifactError(
                f"artifacts: cannot fetch trial {number} from {self.describe('trials', str(number))!r} "
                f"({type(exc).__name__}: {exc}); check that this machine reaches the store"
            ) from None

    def remove_trial(self, number: int) -> None:
        remote = self._path("trials", str(number))
        if self.fs.exists(remote):
            self.fs.rm(remote, recursive=True)

    # -- the reference --------------------------------------------------------------------
    def put_reference(self, local: Path) -> None:
        self._put(local, self._path("reference"), REFERENCE_FILES)

    def fetch_reference(self, local: Path) -> bool:
        return self._get(self._path("reference"), local, REFERENCE_FILES, Path(local).parent)
