"""Compressed-model files: a state_dict plus a JSON spec, loadable with ``weights_only=True``.

A file holds only tensors and plain data (no pickled code)::

    {"format": "rankopt.compressed", "version": 1,
     "base": {"model": "resnet18_cifar", "kwargs": {"num_classes": 10}},
     "spec": {"layer1.0.conv1": {"decomposer": "tucker2", "ranks": [32, 32]}},
     "input_shape": [1, 3, 32, 32], "metadata": {...}, "state_dict": {...},
     "sha256": "..."}   # of all the above: a tampered or corrupted file is refused

``base.model`` names a registered model (``rankopt plugins`` lists them); any other
model (``base.callable``, a factory a study file named by import path) is rebuilt from
an ``nn.Module`` the caller passes: loading a file never imports or runs code it names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rankopt.errors import ArtifactError
from rankopt.safe_paths import atomic_write
from rankopt.surgery import compress, normalize_spec

__all__ = ["save_compressed", "load_base", "load_compressed", "read_compressed", "FORMAT", "VERSION"]

FORMAT = "rankopt.compressed"
VERSION = 1


def _plain(value: Any, where: str) -> Any:
    """Check that ``value`` is JSON-like (it must survive weights_only loading)."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{where} must be JSON-serializable: {exc}") from None


def save_compressed(
    path: str | os.PathLike[str],
    model: nn.Module,
    spec: Mapping[str, Mapping[str, Any]],
    *,
    base: Mapping[str, Any] | None = None,
    input_shape: Sequence[int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (already compressed by ``spec``) to ``path`` atomically."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "base": _plain(dict(base or {}), "base"),
        "spec": normalize_spec(spec),
        "input_shape": list(input_shape) if input_shape is not None else None,
        "metadata": _plain(dict(metadata or {}), "metadata"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    payload["sha256"] = _checksum(payload)
    # a temporary beside it (never through a link), fsync, rename; ENOSPC leaves nothing
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def read_compressed(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw contents of a compressed-model file, checked for format and completeness."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"model file {str(path)!r} does not exist or is not a file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ArtifactError(
            f"model file {str(path)!r} cannot be read safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it is truncated, tampered with "
            "or not a rankopt model file"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(
            f"model file {str(path)!r} is not a rankopt compressed model "
            f"(expected format {FORMAT!r})"
        )
    if payload.get("version") != VERSION:
        raise ArtifactError(
            f"model file {str(path)!r} has format version {payload.get('version')!r}; "
            f"this rankopt reads version {VERSION}"
        )
    missing = [k for k in ("base", "spec", "state_dict") if k not in payload]
    if missing:
        raise ArtifactError(f"model file {str(path)!r} lacks {missing}")
    expected = payload.get("sha256")  # files written before checksums carry none
    if expected is not None and _checksum(payload) != expected:
        raise ArtifactError(
            f"model file {str(path)!r} was tampered with or corrupted: its contents do not "
            "match the checksum written with it; use an intact copy (e.g. `rankopt pick` again)"
        )
    return payload


def _checksum(payload: Mapping[str, Any]) -> str:
    """SHA-256 of everything a file holds (plain data as canonical JSON, then each tensor's
    name, dtype, shape and bytes): detects corruption and edits, not a forger."""
    import hashlib

    h = hashlib.sha256()
    plain = {k: payload.get(k) for k in ("format", "version", "base", "spec", "input_shape", "metadata")}
    h.update(json.dumps(plain, sort_keys=True, default=str).encode())
    state = payload.get("state_dict")
    if not isinstance(state, Mapping):
        return "invalid"
    for key in sorted(state):
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            return "invalid"
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def _build_base(
    base: Any, path: str | os.PathLike[str], allow_modules: Sequence[str] = ()
) -> tuple[Any, dict[str, Any], str]:
    """The factory, keyword arguments and description of the architecture a file names.

    Only a registered model (``base.model``) is built from a file. ``base.callable``
    (``"package.module:callable"``, written for study files that name a factory by import
    path) is followed only when its module is under one of ``allow_modules``, an explicit
    opt-in of the caller; otherwise nothing is imported: importing a module runs its code,
    and a model file is data that anyone may have written.
    """
    if not isinstance(base, dict):
        base = {}
    kwargs = base.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ArtifactError(f"model file {str(path)!r}: base.kwargs must be a mapping, got {kwargs!r}")
    name = base.get("model")
    target = base.get("callable")
    if isinstance(name, str) and name:
        from rankopt.manager import get_registry

        try:
            record = get_registry().record("models", name)
        except Exception as exc:
            raise ArtifactError(f"model file {str(path)!r}: base.model: {exc}") from None
        return record.factory, dict(kwargs), f"registered model {name!r}"
    how = (
        "pass the uncompressed architecture: load_compressed(path, model=MyNet()), or "
        "register the model as a plugin (`rankopt plugins` lists them)"
    )
    if isinstance(target, str) and target:
        module = target.partition(":")[0]
        allowed = any(module == p or module.startswith(p + ".") for p in allow_modules)
        if not allowed:
            raise ArtifactError(
                f"model file {str(path)!r} names the factory {target!r} by import path; "
                "loading a file never imports a module (that would run its code): " + how
                + (", or allow its package: load_compressed(path, allow_modules="
                   f"[{module.split('.')[0]!r}])")
            )
        from rankopt.config import import_model_factory
        from rankopt.errors import ConfigError

        try:
            factory = import_model_factory(str(target), f"model file {str(path)!r}: base.callable")
        except ConfigError as exc:
            raise ArtifactError(str(exc)) from None
        return factory, dict(kwargs), f"factory {target!r}"
    raise ArtifactError(f"model file {str(path)!r} names no registered base model; " + how)


def _check_shapes(
    factory: Any, kwargs: dict[str, Any], payload: Mapping[str, Any], path: Any, what: str
) -> None:
    """Build the architecture on PyTorch's ``meta`` device (no memory is allocated) and
    compare every compressed tensor's shape with the file's, so that ``base.kwargs`` that
    would build a huge model (``width: 1000000``) are refused before anything is allocated."""
    try:
        with torch.device("meta"):
            meta = factory(**kwargs)
            if not isinstance(meta, nn.Module):
                raise ArtifactError(
                    f"model file {str(path)!r}: {what} returned {type(meta).__name__}, not an nn.Module"
                )
            meta = compress(meta, payload["spec"], initialize=False)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(
            f"model file {str(path)!r}: {what} with base.kwargs {kwargs!r} does not build the "
            f"model its spec describes ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    state = payload["state_dict"]
    got = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            raise ArtifactError(
                f"model file {str(path)!r} does not match its spec: {what} with base.kwargs "
                f"{kwargs!r} gives {key!r} the shape {expected.get(key)}, the file holds "
                f"{got.get(key)}; refusing to build it (pass model= to load other weights)"
            )


def load_base(path: str | os.PathLike[str], *, allow_modules: Sequence[str] = ()) -> nn.Module:
    """The uncompressed architecture a model file names (freshly initialized weights), as
    :func:`load_compressed` builds it before applying the file's spec; the same rules on
    what it may import."""
    if isinstance(allow_modules, str):
        allow_modules = [allow_modules]
    payload = read_compressed(path)
    factory, kwargs, what = _build_base(payload["base"], path, allow_modules)
    _check_shapes(factory, kwargs, payload, path, what)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"model file {str(path)!r}: {what} returned {type(model).__name__}")
    return model.eval()


def load_compressed(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
    allow_modules: Sequence[str] = (),
) -> nn.Module:
    """Rebuild a compressed model written by ``rankopt pick`` or :func:`save_compressed`.

    The base architecture comes from ``model`` (an uncompressed instance of the same
    architecture) when given, else from the registered model the file names. Loading
    never imports a module: a file naming a factory by import path needs ``model=``, or
    ``allow_modules`` listing the module prefixes the caller trusts (off by default).
    ``base.kwargs`` are checked against the file's tensor shapes on the ``meta`` device
    before the model is built.
    A file written with ``pick --fold-bn`` (``metadata["fold_bn"]``) keeps the trained
    weights and loads as the BatchNorm-folded ``torch.fx.GraphModule`` (see
    :func:`rankopt.fold_batchnorm`).
    """
    if isinstance(allow_modules, str):
        allow_modules = [allow_modules]
    payload = read_compressed(path)
    if model is None:
        factory, kwargs, what = _build_base(payload["base"], path, allow_modules)
        _check_shapes(factory, kwargs, payload, path, what)
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise ArtifactError(f"model file {str(path)!r}: {what} returned {type(model).__name__}")
    skeleton = compress(model, payload["spec"], initialize=False)
    try:
        skeleton.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ArtifactError(
            f"model file {str(path)!r} does not match its spec: {str(exc).splitlines()[0]}"
        ) from None
    skeleton.eval()
    if (payload.get("metadata") or {}).get("fold_bn"):  # written by `rankopt pick --fold-bn`
        from rankopt.deploy import fold_batchnorm

        skeleton = fold_batchnorm(skeleton)
    return skeleton.to(map_location)
