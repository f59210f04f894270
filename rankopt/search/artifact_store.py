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
import os
import uuid
from pathlib import Path
from typing import Any

from rankopt.config.checks import check_artifacts_url
from rankopt.core.errors import ArtifactError

__all__ = ["ArtifactStore", "file_sha256", "check_artifacts_url", "TRIAL_FILES"]

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

    def _get(self, remote: str, local: Path, names: tuple[str, ...]) -> bool:
        fs = self.fs
        if not fs.exists(f"{remote}/metrics.json"):
            return False
        local.mkdir(parents=True, exist_ok=True)
        for name in names:
            if fs.exists(f"{remote}/{name}"):
                tmp = local / f".{name}.fetch{os.getpid()}"
                fs.get_file(f"{remote}/{name}", str(tmp))
                tmp.replace(local / name)
        return True

    def put_trial(self, number: int, local: Path) -> None:
        self._put(local, self._path("trials", str(number)), TRIAL_FILES)

    def fetch_trial(self, number: int, local: Path) -> bool:
        """Copy trial ``number``'s folder into ``local``; False when the store lacks it."""
        try:
            return self._get(self._path("trials", str(number)), local, TRIAL_FILES)
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
        return self._get(self._path("reference"), local, REFERENCE_FILES)
