"""Reading tensor files that anyone may have written, without trusting their sizes.

``torch.load(weights_only=True)`` runs no code, but it believes every size a file
declares: a 20 KB file can hold a tensor whose one stored value stands for 2 GiB
(a zero stride), a storage that claims more bytes than the file has, or a zip record
whose header claims gigabytes. :func:`load_checked` therefore reads a file twice:

1. the zip directory: every record stored uncompressed (as ``torch.save`` writes them)
   and inside the file, their sizes adding up to at most the file's size;
2. on PyTorch's ``meta`` device (no tensor data is read or allocated): the object's
   depth and node count are bounded, every leaf is plain data or a tensor, and every
   tensor has no zero stride, no overlapping elements, lies inside its storage, and
   all storages together fit in the file's records and in ``max_bytes``;

and only then (3) for real, from the same open file, so what was checked is what loads.
Written by hand because neither torch nor safetensors checks a ``.pt`` file this way.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from rankopt.core.errors import ArtifactError

__all__ = ["load_checked", "check_layout", "check_plain", "DEFAULT_MAX_BYTES", "MAX_DEPTH", "MAX_NODES"]

DEFAULT_MAX_BYTES = 8 << 30  # tensor bytes one file may hold (a ResNet-152 is 0.25 GB)
MAX_DEPTH = 32  # nesting of plain data (a spec or metadata is 3 to 4 deep)
MAX_NODES = 1_000_000  # values visited, shared ones counted each time (memo "billion laughs")
PLAIN = (str, int, float, bool, type(None))


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _check_zip(handle: Any, where: str) -> tuple[int, dict[int, int]]:
    """The bytes the file's records hold, and each record's size by the offset of its data,
    after checking they are stored and inside the file."""
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    if not zipfile.is_zipfile(handle):
        raise ArtifactError(
            f"{where} cannot be read safely (it is no zip archive: truncated, tampered with "
            "or not a rankopt model file; files of torch's legacy format are not read)"
        )
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArtifactError(f"{where} cannot be read safely ({_first_line(exc)}); it is truncated, "
                            "tampered with or not a rankopt model file") from None
    total = 0
    by_offset: dict[int, int] = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise ArtifactError(
                f"{where}: record {info.filename!r} is compressed; torch.save stores records "
                "uncompressed, so the file was not written by torch.save (refused: a compressed "
                "record can expand to any size)"
            )
        if info.header_offset + info.file_size > size:
            raise ArtifactError(
                f"{where}: record {info.filename!r} claims {info.file_size:,} bytes, past the end "
                f"of the {size:,}-byte file; it is truncated or forged"
            )
        total += info.file_size
        handle.seek(info.header_offset)
        header = handle.read(30)  # the local header: its name and extra field precede the data
        if len(header) == 30 and header[:4] == b"PK\x03\x04":
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            by_offset[info.header_offset + 30 + name_len + extra_len] = info.file_size
    if total > size:
        raise ArtifactError(
            f"{where}: its records claim {total:,} bytes together, more than the file's {size:,}; "
            "it is forged"
        )
    return total, by_offset


def check_layout(tensor: torch.Tensor, name: str, where: str) -> None:
    """Refuse a tensor that is not a plain block of its own elements: a zero stride (one
    stored value standing for many), overlapping elements, or elements past its storage."""
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    if tensor.numel() == 0:
        return
    dims = sorted((stride, size) for size, stride in zip(shape, strides) if size > 1)
    span = 1  # elements the inner dimensions reach
    for stride, size in dims:
        if stride == 0:
            raise ArtifactError(
                f"{where}: tensor {name!r} of shape {list(shape)} has a zero stride {list(strides)} "
                "(one stored value stands for many; a model file holds every element); refused"
            )
        if stride < span:
            raise ArtifactError(
                f"{where}: tensor {name!r} of shape {list(shape)} has overlapping strides "
                f"{list(strides)}; refused"
            )
        span += (size - 1) * stride
    storage_elems = tensor.untyped_storage().nbytes() // max(1, tensor.element_size())
    if tensor.storage_offset() + span > storage_elems:
        raise ArtifactError(
            f"{where}: tensor {name!r} of shape {list(shape)} reaches element "
            f"{tensor.storage_offset() + span:,} of a storage of {storage_elems:,}; refused"
        )


def check_plain(value: Any, where: str, *, tensors: list[tuple[str, torch.Tensor]] | None = None,
                max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES) -> None:
    """Walk ``value`` without recursion: only dicts with str keys, lists, tuples, plain
    scalars and (when ``tensors`` is given, collected into it with their paths) tensors,
    at most ``max_depth`` deep and ``max_nodes`` values in all."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    nodes = 0
    while stack:
        item, path, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise ArtifactError(f"{where} holds more than {max_nodes:,} values (shared ones counted "
                                "each time they appear); refused")
        if depth > max_depth:
            raise ArtifactError(f"{where}: {path or 'its contents'} nest deeper than {max_depth} "
                                "levels; refused")
        if isinstance(item, torch.Tensor) and tensors is not None:
            tensors.append((path, item))
        elif isinstance(item, Mapping):
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise ArtifactError(f"{where}: {path or 'a mapping'} has the key {key!r} "
                                        f"({type(key).__name__}); only str keys are allowed")
                stack.append((sub, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(item, (list, tuple)):
            for i, sub in enumerate(item):
                stack.append((sub, f"{path}[{i}]", depth + 1))
        elif not isinstance(item, PLAIN):
            raise ArtifactError(f"{where}: {path or 'its contents'} is a {type(item).__name__}; "
                                    "only plain data and tensors are allowed")


def load_checked(path: str | os.PathLike[str], where: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 check: Callable[[Any, list[tuple[str, torch.Tensor]]], None] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` after the checks in the module docstring.

    ``check(meta_object, meta_tensors)`` may refuse more on the meta copy (shapes,
    dtypes) before anything real is allocated. Raises :class:`ArtifactError`.
    """
    path = Path(path)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - one handle for every pass
    except OSError as exc:
        raise ArtifactError(f"{where} cannot be opened ({_first_line(exc)})") from None
    with handle:
        stored, records = _check_zip(handle, where)
        handle.seek(0)
        try:
            meta = torch.load(handle, map_location="meta", weights_only=True)
        except Exception as exc:
            raise ArtifactError(
                f"{where} cannot be read safely ({_first_line(exc)}); it is truncated, tampered "
                "with or not a rankopt model file"
            ) from None
        tensors: list[tuple[str, torch.Tensor]] = []
        check_plain(meta, where, tensors=tensors)
        seen: dict[int, int] = {}
        total = 0
        for name, tensor in tensors:
            if tensor.is_complex():
                raise ArtifactError(f"{where}: tensor {name!r} is complex ({tensor.dtype}); "
                                    "a model's parameters are real; refused")
            check_layout(tensor, name, where)
            storage = tensor.untyped_storage()
            offset = getattr(storage, "_checkpoint_offset", None)  # where torch will read it from
            if isinstance(offset, int) and records:
                if storage.nbytes() > records.get(offset, 0):
                    raise ArtifactError(
                        f"{where}: tensor {name!r} declares a storage of {storage.nbytes():,} bytes, but "
                        f"its record holds {records.get(offset, 0):,}; it is forged or truncated"
                    )
                seen[offset] = storage.nbytes()
            else:
                seen[storage._cdata] = storage.nbytes()
            total += tensor.numel() * tensor.element_size()
        declared = sum(seen.values())
        if declared > stored:
            raise ArtifactError(
                f"{where}: its tensors declare {declared:,} bytes of storage, but the file's records "
                f"hold {stored:,}; it is forged or truncated"
            )
        if max(total, declared) > max_bytes:
            raise ArtifactError(
                f"{where}: its tensors hold {max(total, declared):,} bytes, more than the bound of "
                f"{max_bytes:,} (max_bytes); pass a larger max_bytes if you trust the file"
            )
        if check is not None:
            check(meta, tensors)
        handle.seek(0)
        try:
            return torch.load(handle, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ArtifactError(
                f"{where} cannot be read safely ({_first_line(exc)}); it is truncated, tampered "
                "with or not a rankopt model file"
            ) from None


def finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite (integers always are)."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return True
    return bool(torch.isfinite(tensor).all()) if tensor.numel() else True

