"""Checks of a study config against the registry and the file system (before any work):
plugin names and their parameters, model and dataset keyword arguments, data paths,
``package.module:callable`` model factories. Also the resolution of a study file's
relative data paths.

:func:`rankopt.config.schema.check_config` runs them on a whole validated config.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rankopt.config.own_model import import_module_from, is_own_function, not_found_message
from rankopt.config.sections import Choices, Range, parse_param_value
from rankopt.core.errors import ConfigError, did_you_mean

__all__ = [
    "check_artifacts_url",
    "CALLABLE_PATTERN",
    "import_callable",
    "import_model_factory",
    "builds_a_module",
]

CALLABLE_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
# keyword arguments of dataset factories that name files or folders
_PATH_KEYS = {"path", "root", "train", "val", "test", "file", "dir", "directory"}
_PATH_SUFFIXES = ("_path", "_dir", "_file", "_root")


def _resolve_data_paths(raw: dict[str, Any], base: Path) -> None:
    """Relative paths in a study file's ``data.kwargs`` are relative to the study file, not
    to the current directory, so a study runs from anywhere. A file named next to a
    ``root`` stays relative to that root (as the dataset reads it)."""
    data = raw.get("data")
    kwargs = data.get("kwargs") if isinstance(data, dict) else None
    if not isinstance(kwargs, dict):
        return

    def resolve(value: Any) -> Any:
        if isinstance(value, str) and value and not value.startswith("~") and not Path(value).is_absolute():
            return str((base / value).resolve())
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    has_root = isinstance(kwargs.get("root"), str)
    for key in list(kwargs):
        if key not in _PATH_KEYS and not key.endswith(_PATH_SUFFIXES):
            continue
        if key == "root" or not has_root:
            kwargs[key] = resolve(kwargs[key])


def _signature_names(fn: Any) -> set[str] | None:
    """Keyword names ``fn`` accepts; None when unknown or it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def import_callable(spec: str, where: str, folders: Sequence[str | None] = ()) -> Any:
    """The callable named by ``"package.module:attribute"``: its module is looked up in
    ``folders`` first (a study file's folder), then on the import path."""
    if not CALLABLE_PATTERN.match(spec):
        raise ConfigError(f"{where}: {spec!r} is not of the form 'package.module:callable'")
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = import_module_from(module_name, folders)
    except ImportError as exc:
        folder = next((str(f) for f in folders if f), None)
        raise ConfigError(not_found_message(where, spec, module_name, folder, exc)) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where}: {spec!r} is not callable")
    return obj


def builds_a_module(factory: Any) -> bool:
    """True for an ``nn.Module`` subclass, a Python function annotated to return one, or a
    plain unannotated function of the user's own code (:func:`rankopt.config.own_model.is_own_function`):
    the only callables rankopt calls as a model factory (never ``os.system``...)."""
    import typing

    import torch.nn as nn

    if inspect.isclass(factory):
        return issubclass(factory, nn.Module)
    target = inspect.unwrap(factory) if inspect.isfunction(factory) else None
    if target is None:
        return False
    if is_own_function(factory):
        return True
    try:
        returns = typing.get_type_hints(target).get("return")
    except Exception:  # unresolvable annotations: not provably a module factory
        return False
    return inspect.isclass(returns) and issubclass(returns, nn.Module)


def import_model_factory(spec: str, where: str, folders: Sequence[str | None] = ()) -> Any:
    """``import_callable`` for a model factory, refused unless :func:`builds_a_module`.

    A study file is trusted like a script (it may import its own module); the check
    still keeps ``model: {name: "os:system", kwargs: {command: ...}}`` from being called.
    """
    factory = import_callable(spec, where, folders)
    if not builds_a_module(factory):
        raise ConfigError(
            f"{where}: {spec!r} is neither an nn.Module subclass nor a function annotated to "
            "return one (nor a plain function of your own code), so rankopt will not call it; "
            "name a model class, or annotate the factory `-> nn.Module`"
        )
    return factory


def _check_kwargs(factory: Any, kwargs: Mapping[str, Any], where: str, extra: tuple[str, ...] = ()) -> None:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    names = [
        p.name for p in sig.parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    unknown = sorted(set(kwargs) - set(names) - set(extra))
    if unknown:
        close = did_you_mean(unknown[0], names) if len(unknown) == 1 else ""
        raise ConfigError(
            f"{where}: unknown parameter(s) {unknown}{close}; accepted parameters are {names}"
        )


def _check_data_paths(kwargs: Mapping[str, Any], where: str, download_ok: bool = True) -> None:
    """Every file or folder a dataset's keyword arguments name must exist (before any work).

    Relative paths are read from ``root`` when the dataset takes one as the base of its
    files (``npz``), else from the current directory.
    """
    download = bool(kwargs.get("download", False))
    root = kwargs.get("root")
    for key, value in kwargs.items():
        if key not in _PATH_KEYS and not key.endswith(_PATH_SUFFIXES):
            continue
        if key == "root" and download:
            continue  # torchvision creates it
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(values):
            if not isinstance(item, str):
                continue
            path = Path(item).expanduser()
            if key != "root" and isinstance(root, str) and not path.is_absolute():
                path = Path(root).expanduser() / path
            if not path.exists():
                field = f"{where}.{key}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")
                raise ConfigError(
                    f"{field}: path {item!r} does not exist (looked for {str(path)!r}; relative "
                    f"paths are read from a study file's folder, or from the current directory "
                    f"{os.getcwd()!r} for a config given from Python); fix the path"
                    + (" or set download: true" if key == "root" and download_ok else "")
                )


def _check_plugin_params(
    plugin: Any, family: str, name: str, params: Mapping[str, Any], where: str
) -> None:
    """Parameter names against the plugin's declared ones; fixed values and range ends against
    the plugin's own ``validate_params``."""
    known = set(plugin.defaults()) | set(plugin.search_space()) | ({"preset"} if family == "strategy" else set())
    unknown = sorted(set(params) - known)
    if unknown and (known or family == "strategy"):
        close = did_you_mean(unknown[0], known) if len(unknown) == 1 else ""
        raise ConfigError(
            f"{where}: {family} {name!r} has no parameter(s) {unknown}{close}; its parameters are "
            f"{sorted(known) or '(none)'}"
        )
    parsed = {k: parse_param_value(v, f"{where}.{k}") for k, v in params.items()}
    for key, value in parsed.items():
        probes = (
            [value.low, value.high] if isinstance(value, Range)
            else value.choices if isinstance(value, Choices) else [value]
        )
        for probe in probes:
            try:
                plugin.validate_params({key: probe})
            except ConfigError as exc:
                raise ConfigError(f"{where}.{key}: {probe!r} is not allowed: {exc}") from None


def _check_finite(value: Any, where: str) -> None:
    """No inf/NaN anywhere in free-form settings (an ``epochs: .inf`` never ends)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not allowed; give a finite number")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


def _check_epochs(value: Any, where: str, inside: bool = False) -> None:
    """Every number under a key named ``epochs`` (a value or a searched range) at most
    :data:`~rankopt.core.limits.MAX_EPOCHS`: ``epochs: 1e9`` would train for years."""
    from rankopt.core.limits import MAX_EPOCHS

    number = value
    if isinstance(value, str):  # YAML 1.1 reads 1e9 as a string; the strategy converts it
        try:
            number = float(value)
        except ValueError:
            number = None
    if inside and isinstance(number, (int, float)) and not isinstance(number, bool) and number > MAX_EPOCHS:
        raise ConfigError(
            f"{where}: {value!r} is above the limit of {MAX_EPOCHS:,} epochs (allowed: 0 to "
            f"{MAX_EPOCHS:,}); give fewer epochs"
        )
    if isinstance(value, Mapping):
        for key, item in value.items():
            _check_epochs(item, f"{where}.{key}", inside or str(key).endswith("epochs"))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_epochs(item, f"{where}[{i}]", inside)


def _named(reg: Any, family: str, name: str, where: str) -> Any:
    from rankopt.core.errors import UnknownNameError

    try:
        return reg.create(family, name)
    except UnknownNameError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# artifact-store protocols that keep nothing once the process ends
VOLATILE_PROTOCOLS = frozenset({"memory"})


def check_artifacts_url(url: str) -> str:
    """``url`` made absolute when it is a local path; a ConfigError for an unknown protocol
    or a missing fsspec implementation (checked before any work)."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in VOLATILE_PROTOCOLS:
        raise ConfigError(
            f"artifacts: {url!r} uses protocol {protocol!r}, which keeps nothing after this "
            "process ends (other machines, and a later pick, would find no trial); give a "
            "shared folder or an s3://, gs://, sftp://... URL"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise ConfigError(
            f"artifacts: {url!r} uses protocol {protocol!r}, which fsspec cannot open "
            f"({str(exc).splitlines()[0]}); give a shared folder, file://, s3://, gs://, "
            "sftp://... URL and install its fsspec package (e.g. s3fs)"
        ) from None
    if "://" not in url:
        return os.path.abspath(os.path.expanduser(url))
    return url
