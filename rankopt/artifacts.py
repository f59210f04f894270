"""Compressed-model files: a state_dict plus a JSON spec, loadable with ``weights_only=True``.

A file holds only tensors and plain data (no pickled code)::

    {"format": "rankopt.compressed", "version": 1,
     "base": {"model": "resnet18_cifar", "kwargs": {"num_classes": 10}},
     "spec": {"layer1.0.conv1": {"decomposer": "tucker2", "ranks": [32, 32]}},
     "input_shape": [1, 3, 32, 32], "metadata": {...}, "state_dict": {...},
     "sha256": "..."}   # of all the above: a tampered or corrupted file is refused

``base.model`` names a registered model (``rankopt plugins`` lists them), or
``base.callable`` an explicit ``"package.module:callable"`` of an installed module
(called with ``base.kwargs``); any other model is rebuilt from an ``nn.Module`` the
caller passes.
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
from rankopt.surgery import compress, normalize_spec

__all__ = ["save_compressed", "load_compressed", "read_compressed", "FORMAT", "VERSION"]

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    tmp.replace(path)
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


def _build_base(base: Any, path: str | os.PathLike[str]) -> nn.Module:
    """The uncompressed architecture a file names: a registered model, or an explicit
    ``"package.module:callable"`` of an installed module (the only code a file can name)."""
    kwargs = dict(base.get("kwargs") or {}) if isinstance(base, dict) else {}
    name = base.get("model") if isinstance(base, dict) else None
    target = base.get("callable") if isinstance(base, dict) else None
    if name:
        from rankopt.manager import get_registry

        return get_registry().create("models", name, **kwargs)  # type: ignore[no-any-return]
    if target:
        from rankopt.config import import_callable
        from rankopt.errors import ConfigError

        try:
            factory = import_callable(str(target), f"model file {str(path)!r}: base.callable")
        except ConfigError as exc:
            raise ArtifactError(str(exc)) from None
        if not _builds_a_module(factory):
            raise ArtifactError(
                f"model file {str(path)!r}: base.callable {target!r} is neither an nn.Module "
                "class nor a function annotated to return one, so loading will not call it "
                "(a file must not be able to run arbitrary code); annotate the factory "
                "`-> nn.Module`, or pass the architecture: load_compressed(path, model=MyNet())"
            )
        built = factory(**kwargs)
        if not isinstance(built, nn.Module):
            raise ArtifactError(
                f"model file {str(path)!r}: base.callable {target!r} returned "
                f"{type(built).__name__}, not an nn.Module"
            )
        return built
    raise ArtifactError(
        f"model file {str(path)!r} names no registered base model or callable; pass the "
        "uncompressed architecture: load_compressed(path, model=MyNet())"
    )


def _builds_a_module(factory: Any) -> bool:
    """True for an ``nn.Module`` subclass, or a Python function annotated to return one:
    the only callables a model file may have called (never ``os.system``, ``torch.load``...)."""
    import inspect
    import typing

    if inspect.isclass(factory):
        return issubclass(factory, nn.Module)
    if not inspect.isfunction(factory):
        return False
    try:
        returns = typing.get_type_hints(factory).get("return")
    except Exception:  # unresolvable annotations: not provably a module factory
        return False
    return inspect.isclass(returns) and issubclass(returns, nn.Module)


def load_compressed(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Rebuild a compressed model written by ``rankopt pick`` or :func:`save_compressed`.

    The base architecture comes from the registered model named in the file, or from
    ``model`` (an uncompressed instance of the same architecture) when given. A file
    written with ``pick --fold-bn`` (``metadata["fold_bn"]``) keeps the trained weights
    and loads as the BatchNorm-folded ``torch.fx.GraphModule`` (see
    :func:`rankopt.fold_batchnorm`).
    """
    payload = read_compressed(path)
    if model is None:
        model = _build_base(payload["base"], path)
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
