"""The spectral cache: SVDs of weight matrices, computed once per content.

Keys are a hash of the matrix's bytes, shape and dtype, so a changed weight misses
by construction (no explicit invalidation needed). Entries live in memory and, when a
directory is given, on disk as ``.pt`` files that later trials and processes of the
same study reuse.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

import torch

__all__ = ["SpectralCache", "SVD", "get_default_cache", "set_default_cache", "matrix_key"]

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def matrix_key(matrix: torch.Tensor) -> str:
    """A content hash of ``matrix`` (values, shape, dtype)."""
    m = matrix.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=20)
    h.update(str((tuple(m.shape), str(m.dtype))).encode())
    h.update(m.view(torch.uint8).numpy().tobytes() if m.numel() else b"")
    return h.hexdigest()


class SpectralCache:
    """Thin SVDs ``(U, S, Vh)`` of matrices, keyed by content.

    ``svd_calls`` counts the SVDs actually computed (cache misses).
    """

    def __init__(self, directory: str | Path | None = None, max_items: int = 512) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_items = max_items
        self._mem: OrderedDict[str, SVD] = OrderedDict()
        self._lock = threading.Lock()
        self.svd_calls = 0
        self.hits = 0

    def svd(self, matrix: torch.Tensor) -> SVD:
        """``torch.linalg.svd(matrix, full_matrices=False)`` in float64, cached, on CPU."""
        key = matrix_key(matrix)
        with self._lock:
            if key in self._mem:
                self._mem.move_to_end(key)
                self.hits += 1
                return self._mem[key]
        result = self._load(key)
        if result is None:
            usv = torch.linalg.svd(matrix.detach().double().cpu(), full_matrices=False)
            result = (usv[0], usv[1], usv[2])
            self.svd_calls += 1
            self._store(key, result)
        else:
            self.hits += 1
        with self._lock:
            self._mem[key] = result
            while len(self._mem) > self.max_items:
                self._mem.popitem(last=False)
        return result

    def singular_values(self, matrix: torch.Tensor) -> torch.Tensor:
        return self.svd(matrix)[1]

    def _path(self, key: str) -> Path | None:
        return self.directory / f"{key}.pt" if self.directory is not None else None

    def _load(self, key: str) -> SVD | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            u, s, vh = torch.load(path, map_location="cpu", weights_only=True)
            return (u, s, vh)
        except Exception:  # a torn or foreign file is just a miss
            return None

    def _store(self, key: str, value: SVD) -> None:
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        torch.save(tuple(value), tmp)
        tmp.replace(path)  # atomic, so concurrent processes never read half a file

    def clear_memory(self) -> None:
        with self._lock:
            self._mem.clear()


_default = SpectralCache()


def get_default_cache() -> SpectralCache:
    """The process-wide cache used when none is passed."""
    return _default


def set_default_cache(cache: SpectralCache) -> None:
    global _default
    _default = cache
