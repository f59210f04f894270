"""The spectral cache: SVDs of weight matrices, computed once per content.

Keys are a hash of the matrix's bytes, shape and dtype, so a changed weight misses
by construction (no explicit invalidation needed). Entries live in memory (a
least-recently-used store bounded in bytes) and, when a directory is given, on disk
as ``.pt`` files (loaded with ``weights_only=True``) that later trials and processes
of the same study reuse, e.g. ``<run_dir>/cache/spectral/``.

Two kinds of entries share a key: the singular values alone (what rank selectors
need; about twice as fast to compute) and the thin SVD ``(U, S, Vh)`` (what
decomposers need). A full SVD also answers later requests for singular values.

Decompositions run in float64 on the matrix's device, on the tall orientation of
the matrix (LAPACK is several times faster on a contiguous tall matrix than on a
wide one); results are stored on the CPU.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from rankopt.core.errors import UnsafePathError
from rankopt.core.safe_paths import atomic_write

__all__ = [
    "SpectralCache",
    "SVD",
    "get_default_cache",
    "set_default_cache",
    "matrix_key",
    "DEFAULT_MEMORY_BYTES",
]

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

DEFAULT_MEMORY_BYTES = 1 << 30  # 1 GiB of cached factors in memory per process


def matrix_key(matrix: torch.Tensor) -> str:
    """A content hash of ``matrix`` (values, shape, dtype)."""
    m = matrix.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=20)
    h.update(str((tuple(m.shape), str(m.dtype))).encode())
    h.update(m.view(torch.uint8).numpy().tobytes() if m.numel() else b"")
    return h.hexdigest()


def _nbytes(value: SVD | torch.Tensor) -> int:
    tensors = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in tensors)


def _thin_svd(matrix: torch.Tensor) -> SVD:
    m = matrix.detach().to(torch.float64)
    if m.shape[0] < m.shape[1]:  # wide: decompose the tall transpose, swap the factors
        u, s, vh = torch.linalg.svd(m.T.contiguous(), full_matrices=False)
        return (vh.T.contiguous().cpu(), s.cpu(), u.T.contiguous().cpu())
    u, s, vh = torch.linalg.svd(m.contiguous(), full_matrices=False)
    return (u.cpu(), s.cpu(), vh.cpu())


def _singular_values(matrix: torch.Tensor) -> torch.Tensor:
    m = matrix.detach().to(torch.float64)
    if m.shape[0] < m.shape[1]:
        m = m.T
    return torch.linalg.svdvals(m.contiguous()).cpu()


class SpectralCache:
    """Thin SVDs ``(U, S, Vh)`` and singular values of matrices, keyed by content.

    Args:
        directory: where entries persist across processes (None: memory only).
        max_bytes: the memory store's bound; the least recently used entries go first
            (they stay on disk).

    ``svd_calls`` counts the decompositions actually computed (full SVDs and
    singular-value-only ones alike); ``hits`` the requests answered from memory or disk.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        max_bytes: int = DEFAULT_MEMORY_BYTES,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = int(max_bytes)
        self._mem: OrderedDict[tuple[str, str], SVD | torch.Tensor] = OrderedDict()
        self._mem_bytes = 0
        self._lock = threading.Lock()
        self.svd_calls = 0
        self.hits = 0
        self._reported: set[Path] = set()

    # -- public ------------------------------------------------------------------------
    def svd(self, matrix: torch.Tensor) -> SVD:
        """``torch.linalg.svd(matrix, full_matrices=False)`` in float64 on the CPU, cached."""
        key = matrix_key(matrix)
        found = self._get(key, "svd", shape=tuple(matrix.shape))
        if found is not None:
            return found  # type: ignore[return-value]
        result = _thin_svd(matrix)
        with self._lock:
            self.svd_calls += 1
        self._put(key, "svd", result)
        self._put(key, "s", result[1])
        return result

    def singular_values(self, matrix: torch.Tensor) -> torch.Tensor:
        """The singular values of ``matrix`` (float64, descending, on the CPU), cached."""
        key = matrix_key(matrix)
        shape = tuple(matrix.shape)
        found = self._get(key, "s", shape=shape)
        if found is None:
            full = self._get(key, "svd", count=False, shape=shape)
            if full is not None:
                found = full[1]  # type: ignore[index]
                self._put(key, "s", found)
        if found is not None:
            return found  # type: ignore[return-value]
        s = _singular_values(matrix)
        with self._lock:
            self.svd_calls += 1
        self._put(key, "s", s)
        return s

    def clear_memory(self) -> None:
        """Forget the in-memory entries (the disk ones stay)."""
        with self._lock:
            self._mem.clear()
            self._mem_bytes = 0

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory is not None else "memory only"
        return f"SpectralCache({where!r}, entries={len(self._mem)}, svd_calls={self.svd_calls})"

    # -- storage -----------------------------------------------------------------------
    def _get(self, key: str, kind: str, *, count: bool = True,
             shape: tuple[int, ...] = ()) -> SVD | torch.Tensor | None:
        with self._lock:
            value = self._mem.get((key, kind))
            if value is not None:
                self._mem.move_to_end((key, kind))
                if count:
                    self.hits += 1
                return value
        value = self._load(key, kind, shape)
        if value is not None:
            if count:
                with self._lock:
                    self.hits += 1
            self._remember(key, kind, value)
        return value

    def _put(self, key: str, kind: str, value: SVD | torch.Tensor) -> None:
        self._remember(key, kind, value)
        self._store(key, kind, value)

    def _remember(self, key: str, kind: str, value: SVD | torch.Tensor) -> None:
        size = _nbytes(value)
        with self._lock:
            old = self._mem.pop((key, kind), None)
            if old is not None:
                self._mem_bytes -= _nbytes(old)
            if size > self.max_bytes:
                return
            self._mem[(key, kind)] = value
            self._mem_bytes += size
            while self._mem_bytes > self.max_bytes:
                _, dropped = self._mem.popitem(last=False)
                self._mem_bytes -= _nbytes(dropped)

    def _path(self, key: str, kind: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / key[:2] / f"{key}.{kind}.pt"

    def _load(self, key: str, kind: str, shape: tuple[int, ...]) -> SVD | torch.Tensor | None:
        """The disk entry for a ``shape`` matrix, or None (a miss, recomputed and rewritten)
        when there is none or it is unusable: torn, foreign, of the wrong shape or dtype, a
        zero-stride or oversized tensor (checked on the meta device first) or not finite;
        an unusable entry is reported once, with its reason, as a warning."""
        path = self._path(key, kind)
        if path is None or not path.is_file():
            return None
        from rankopt.core.errors import ArtifactError
        from rankopt.core.safe_load import load_checked

        where = f"spectral cache entry {str(path)!r}"
        m, n = shape if len(shape) == 2 else (0, 0)
        k = min(m, n)
        want = [(m, k), (k,), (k, n)] if kind == "svd" else [(k,)]

        def check(value: object, tensors: list[tuple[str, torch.Tensor]]) -> None:
            parts = list(value) if kind == "svd" and isinstance(value, (tuple, list)) else [value]
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in parts]
            if got != want or any(t.dtype != torch.float64 for t in parts):
                raise ArtifactError(f"{where} holds {got} ({[getattr(t, 'dtype', None) for t in parts]}), "
                                    f"not the float64 {'(U, S, Vh)' if kind == 'svd' else 'S'} of shapes {want} "
                                    f"a {m}x{n} matrix has")

        try:
            value = load_checked(path, where, max_bytes=8 * (m * k + k + k * n) + (1 << 16), check=check)
            parts = list(value) if kind == "svd" else [value]
            if not all(torch.isfinite(t).all() for t in parts):
                raise ArtifactError(f"{where} holds values that are not finite (NaN or infinity)")
            if kind == "s" and bool((value < 0).any()):
                raise ArtifactError(f"{where} holds negative singular values")
        except ArtifactError as exc:
            self._report(path, str(exc))
            return None
        if kind == "svd":
            return (parts[0], parts[1], parts[2])
        return value  # type: ignore[no-any-return]

    def _report(self, path: Path, reason: str) -> None:
        import warnings

        with self._lock:
            if path in self._reported:
                return
            self._reported.add(path)
        warnings.warn(f"{reason}; ignored, the decomposition is computed again and the entry "
                      "rewritten", RuntimeWarning, stacklevel=4)

    def _store(self, key: str, kind: str, value: SVD | torch.Tensor) -> None:
        path = self._path(key, kind)
        if path is None:
            return
        data = tuple(value) if isinstance(value, tuple) else value
        # atomic (concurrent processes never read half a file), never through a link
        try:
            atomic_write(path, lambda f: torch.save(data, f), root=self.directory)
        except UnsafePathError:  # a planted link: not written through; a miss next time
            return


_default = SpectralCache()


def get_default_cache() -> SpectralCache:
    """The process-wide cache used when none is passed."""
    return _default


def set_default_cache(cache: SpectralCache) -> None:
    """Make ``cache`` the process-wide default (e.g. one on ``<run_dir>/cache/spectral``)."""
    global _default
    if not isinstance(cache, SpectralCache):
        raise TypeError(f"set_default_cache expects a SpectralCache, got {type(cache).__name__}")
    _default = cache
