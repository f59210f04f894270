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
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rankopt.core.errors import ArtifactError, RankoptError
from rankopt.core.safe_load import DEFAULT_MAX_BYTES, load_checked
from rankopt.core.safe_paths import atomic_write
from rankopt.compression.surgery import compress, normalize_spec

__all__ = ["save_compressed", "load_base", "load_compressed", "build_compressed", "read_compressed", "offline_kwargs",
           "FORMAT", "VERSION"]

FORMAT = "rankopt.compressed"
VERSION = 1
MAX_SAMPLE_ELEMENTS = 1 << 24  # values in one input sample a file may declare (export allocates a batch)


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


def read_compressed(
    path: str | os.PathLike[str], *, allow_unchecked: bool = False, max_bytes: int = DEFAULT_MAX_BYTES
) -> dict[str, Any]:
    """The raw contents of a compressed-model file, checked for format and completeness.

    Every size the file declares is checked on the ``meta`` device before anything is
    allocated or hashed (:func:`rankopt.core.safe_load.load_checked`; ``max_bytes`` bounds the
    tensor bytes), then its layout and its ``sha256``. A file without a checksum (written
    before rankopt wrote them, or with the key deleted) is refused unless
    ``allow_unchecked=True`` (CLI: ``--allow-unchecked``), which loads it with a warning.
    """
    path = Path(path)
    where = f"model file {str(path)!r}"
    if not path.is_file():
        raise ArtifactError(f"{where} does not exist or is not a file")
    payload = load_checked(path, where, max_bytes=max_bytes, check=lambda meta, _: _check_layout(meta, where))
    expected = payload.get("sha256")
    if expected is None:
        if not allow_unchecked:
            raise ArtifactError(
                f"{where} carries no sha256 checksum (rankopt writes one into every file; it was "
                "written by an older version, or the key was removed), so corruption and edits "
                "cannot be detected; if you trust the file, load it with allow_unchecked=True "
                "(CLI: --allow-unchecked)"
            )
        warnings.warn(f"{where} carries no checksum: loading it unchecked (allow_unchecked=True)",
                      UserWarning, stacklevel=2)
    elif _checksum(payload) != expected:
        raise ArtifactError(
            f"{where} was tampered with or corrupted: its contents do not "
            "match the checksum written with it; use an intact copy (e.g. `rankopt pick` again)"
        )
    return payload


def _check_layout(payload: Any, where: str) -> None:
    """The parts of a file and their types (on the meta copy: before any allocation)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ArtifactError(f"{where} is not a rankopt compressed model (expected format {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise ArtifactError(
            f"{where} has format version {payload.get('version')!r}; this rankopt reads version {VERSION}"
        )
    missing = [k for k in ("base", "spec", "state_dict") if k not in payload]
    if missing:
        raise ArtifactError(f"{where} lacks {missing}")
    for key, kind in (("base", dict), ("spec", dict), ("state_dict", dict), ("metadata", (dict, type(None)))):
        if not isinstance(payload.get(key), kind):
            raise ArtifactError(
                f"{where}: {key} must be a mapping, got {type(payload.get(key)).__name__}; "
                "the file is damaged or was not written by rankopt"
            )
    for name, tensor in payload["state_dict"].items():
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"{where}: state_dict[{name!r}] must be a tensor, got {type(tensor).__name__}")
    for name, value in payload.items():
        if name != "state_dict" and _holds_tensor(value):
            raise ArtifactError(f"{where}: {name} holds a tensor; only state_dict may")
    shape = payload.get("input_shape")
    if shape is not None and not (
        isinstance(shape, list) and 1 <= len(shape) <= 8
        and all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1 << 20 for n in shape)
    ):
        raise ArtifactError(f"{where}: input_shape must be a list of 1 to 8 positive sizes, got {shape!r}")
    if shape is not None and math.prod(shape[1:]) > MAX_SAMPLE_ELEMENTS:
        raise ArtifactError(f"{where}: input_shape {shape} means {math.prod(shape[1:]):,} values per sample, "
                            f"more than {MAX_SAMPLE_ELEMENTS:,} (a 3x2048x2048 image has 12.6 million); refused")
    if "sha256" in payload and not isinstance(payload["sha256"], str):
        raise ArtifactError(f"{where}: sha256 must be a hex string, got {type(payload['sha256']).__name__}")


def _holds_tensor(value: Any) -> bool:
    stack = [value]
    while stack:  # depth was bounded by load_checked
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


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
        # sizes were checked by load_checked (or the tensor is the caller's own): a
        # contiguous tensor is hashed in place, another copied once (never a broadcast)
        h.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy() if tensor.numel() else b"")
    return h.hexdigest()


def _build_base(
    base: Any, path: str | os.PathLike[str], allow_modules: Sequence[str] = (),
    module_folders: Sequence[str | None] = (),
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
    kwargs = offline_kwargs(kwargs, f"model file {str(path)!r}: base.kwargs")
    name = base.get("model")
    target = base.get("callable")
    if isinstance(name, str) and name:
        from rankopt.contract.manager import get_registry

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
        top = module.split(".")[0]
        if not allowed:
            raise ArtifactError(
                f"model file {str(path)!r} names the factory {target!r}; loading a file never imports a module "
                f"unless allowed: `--allow-module {top}` (CLI), load_compressed(path, "
                f"allow_modules=[{top!r}]), or load_compressed(path, model=MyNet())"
            )
        from rankopt.config.schema import import_model_factory
        from rankopt.core.errors import ConfigError

        # the folders the caller trusts (a run's study folder), then the model file's own,
        # then the import path; never a folder the file names (anyone may have written it)
        folders = [*module_folders, str(Path(path).parent)]
        try:
            factory = import_model_factory(str(target), f"model file {str(path)!r}: base.callable", folders)
        except ConfigError as exc:
            raise ArtifactError(str(exc)) from None
        return factory, dict(kwargs), f"factory {target!r}"
    raise ArtifactError(f"model file {str(path)!r} names no registered base model; " + how)


# keyword arguments with which model builders fetch weights (torchvision: weights,
# weights_backbone; timm and older torchvision: pretrained, pretrained_backbone)
_FETCHING = ("weights", "pretrained")
_FETCH_OFF: dict[str, Any] = {"weights": None, "pretrained": False, "download": False}


def offline_kwargs(kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``kwargs`` with every argument that would make a builder download switched off.

    A file's weights replace the built model's anyway, so pretrained weights are never
    needed to load it; a URL anywhere in the arguments is refused: loading a file never
    reaches the network.
    """
    def walk(value: Any, at: str) -> Any:
        if isinstance(value, Mapping):
            out = {}
            for key, sub in value.items():
                name = str(key).lower()
                if name.startswith(_FETCHING) or name == "download":
                    off = _FETCH_OFF["download" if name == "download" else
                                     "weights" if name.startswith("weights") else "pretrained"]
                    out[key] = off if sub not in (None, False) else sub
                else:
                    out[key] = walk(sub, f"{at}.{key}")
            return out
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v, f"{at}[{i}]") for i, v in enumerate(value))
        if isinstance(value, str) and "://" in value:
            raise ArtifactError(f"{at}: {value!r} is a URL; loading a model file never fetches "
                                "anything (pass model= with the architecture built yourself)")
        return value

    return walk(dict(kwargs), where)


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
    check_dtypes(meta.state_dict(), state, f"model file {str(path)!r}")


def check_dtypes(expected: Mapping[str, torch.Tensor], state: Mapping[str, Any], where: str) -> None:
    """Refuse a file tensor whose kind differs from the model's: a complex or integer
    tensor for a float parameter (``load_state_dict`` would drop the imaginary part or
    round silently), a float for an integer buffer."""
    for key, want in expected.items():
        have = state.get(key)
        if not isinstance(have, torch.Tensor):
            continue
        ok = (not have.is_complex() and (have.is_floating_point() == want.is_floating_point())
              and (have.dtype == torch.bool) == (want.dtype == torch.bool))
        if not ok:
            raise ArtifactError(
                f"{where}: tensor {key!r} is {have.dtype}, the model's is {want.dtype}; a "
                f"{'floating-point' if want.is_floating_point() else str(want.dtype)} tensor is "
                "needed (nothing is converted silently)"
            )


def load_base(path: str | os.PathLike[str], *, allow_modules: Sequence[str] = (),
              module_folders: Sequence[str | None] = (), allow_unchecked: bool = False,
              max_bytes: int = DEFAULT_MAX_BYTES) -> nn.Module:
    """The uncompressed architecture a model file names (freshly initialized weights), as
    :func:`load_compressed` builds it before applying the file's spec; the same rules on
    what it may import."""
    if isinstance(allow_modules, str):
        allow_modules = [allow_modules]
    payload = read_compressed(path, allow_unchecked=allow_unchecked, max_bytes=max_bytes)
    factory, kwargs, what = _build_base(payload["base"], path, allow_modules, module_folders)
    _check_shapes(factory, kwargs, payload, path, what)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ArtifactError(f"model file {str(path)!r}: {what} returned {type(model).__name__}")
    return model.eval()


def _first_detail(exc: BaseException) -> str:
    """The first telling line of a load_state_dict or surgery error (its header says nothing)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("size mismatch", "Missing key", "Unexpected key")) or "is not a submodule" in line:
            return line.split(";")[0].rstrip(".")[:160]
    return (lines[-1] if lines else type(exc).__name__).split(";")[0][:160]


def _describe_base(base: Any) -> str:
    base = base if isinstance(base, dict) else {}
    if base.get("model"):
        return f"registered model {base['model']!r}"
    if base.get("callable"):
        return f"factory {base['callable']!r}"
    if base.get("class"):
        return f"a module of class {str(base['class']).rpartition('.')[2]}"
    return "an unnamed architecture"


def load_compressed(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
    allow_modules: Sequence[str] = (),
    module_folders: Sequence[str | None] = (),
    allow_unchecked: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> nn.Module:
    """Rebuild a compressed model written by ``rankopt pick`` or :func:`save_compressed`.

    The base architecture comes from ``model`` (an uncompressed instance of the same
    architecture) when given, else from the registered model the file names. Loading
    never imports a module: a file naming a factory by import path needs ``model=``, or
    ``allow_modules`` listing the module prefixes the caller trusts (off by default); an
    allowed module is looked up in ``module_folders`` (e.g. the study file's folder), then
    beside the file, then on the import path.
    ``base.kwargs`` are checked against the file's tensor shapes on the ``meta`` device
    before the model is built; every size the file declares is checked before anything
    is allocated (``max_bytes`` bounds its tensors), its checksum is required (a file
    without one loads only with ``allow_unchecked=True``, with a warning), and arguments
    that would download weights (``weights``, ``pretrained``...) are switched off: loading
    never reaches the network.
    A file written with ``pick --fold-bn`` (``metadata["fold_bn"]``) keeps the trained
    weights and loads BatchNorm-folded, as a module of its own class (see
    :func:`rankopt.fold_batchnorm`).
    """
    payload = read_compressed(path, allow_unchecked=allow_unchecked, max_bytes=max_bytes)
    return build_compressed(payload, path, model, map_location=map_location, allow_modules=allow_modules,
                            module_folders=module_folders)


def build_compressed(
    payload: Mapping[str, Any],
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
    allow_modules: Sequence[str] = (),
    module_folders: Sequence[str | None] = (),
) -> nn.Module:
    """The model of a file's contents already read by :func:`read_compressed` (so a
    caller that checked them loads exactly what it checked); see :func:`load_compressed`."""
    if isinstance(allow_modules, str):
        allow_modules = [allow_modules]
    passed = model is not None
    if model is None:
        factory, kwargs, what = _build_base(payload["base"], path, allow_modules, module_folders)
        _check_shapes(factory, kwargs, payload, path, what)
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise ArtifactError(f"model file {str(path)!r}: {what} returned {type(model).__name__}")
    try:
        skeleton = compress(model, payload["spec"], initialize=False)
        check_dtypes(skeleton.state_dict(), payload["state_dict"], f"model file {str(path)!r}")
        skeleton.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, RankoptError) as exc:
        detail = _first_detail(exc)
        if passed:  # the module passed is the suspect, not the file
            raise ArtifactError(
                f"model file {str(path)!r} was compressed from {_describe_base(payload['base'])}; the "
                f"model= passed ({type(model).__name__}) is another architecture: {detail}; pass an "
                "uncompressed instance of the file's architecture"
            ) from None
        raise ArtifactError(f"model file {str(path)!r} does not match its spec: {detail}") from None
    skeleton.eval()
    if (payload.get("metadata") or {}).get("fold_bn"):  # written by `rankopt pick --fold-bn`
        from rankopt.deploy.exporting import fold_batchnorm

        skeleton = fold_batchnorm(skeleton)
    return skeleton.to(map_location)
