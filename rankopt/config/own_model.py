"""The user's own model code: a ``module:factory`` name looked up beside the study file
first, then on the import path, and the rule for which plain functions rankopt calls.

Sits below :mod:`rankopt.config.checks` and imports nothing of rankopt but its errors.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


__all__ = ["module_file_in", "import_module_from", "is_own_function", "not_found_message", "LOOKUP_HINT"]

LOOKUP_HINT = "looked beside the study file, then on the import path (PYTHONPATH)"


def module_file_in(folder: str | os.PathLike[str] | None, module_name: str) -> Path | None:
    """The file or package folder of ``module_name``'s top-level package in ``folder``."""
    if not folder:
        return None
    top = module_name.split(".")[0]
    base = Path(folder)
    for candidate in (base / f"{top}.py", base / top / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@contextmanager
def _first_on_path(folder: str) -> Iterator[None]:
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        try:
            sys.path.remove(folder)  # the first occurrence: the one put there
        except ValueError:
            pass


def _forget(top: str) -> None:
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


def import_module_from(module_name: str, folders: Sequence[str | os.PathLike[str] | None]) -> Any:
    """``module_name`` imported from the first of ``folders`` that holds it, else from the
    import path. A module of the same name imported earlier from another file is imported
    again from the folder (two studies may each have their own ``mynet.py``)."""
    for folder in folders:
        found = module_file_in(folder, module_name)
        if found is None:
            continue
        top = module_name.split(".")[0]
        loaded = sys.modules.get(top)
        loaded_file = getattr(loaded, "__file__", None)
        if loaded is not None and (loaded_file is None or Path(loaded_file).resolve() != found.resolve()):
            _forget(top)
        with _first_on_path(str(Path(folder).resolve())):  # type: ignore[arg-type]
            module = importlib.import_module(module_name)
        _pickle_by_value(module)
        return module
    return importlib.import_module(module_name)


def _pickle_by_value(module: Any) -> None:
    """Ray workers on other machines have no study folder to import the module from:
    cloudpickle (Ray's pickler) then ships the module's code with the model."""
    try:
        import cloudpickle
    except ImportError:
        return
    try:
        cloudpickle.register_pickle_by_value(sys.modules[module.__name__.split(".")[0]])
    except (ValueError, KeyError):
        pass


def _library_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs |= {p for p in sys.path if p and ("site-packages" in p or "dist-packages" in p)}
    return [Path(d).resolve() for d in dirs if d]


def is_own_function(fn: Any) -> bool:
    """A plain Python function defined in the user's own code: not a builtin, not from the
    standard library and not from an installed package (site-packages), and not annotated
    to return something other than a module. Such a function may be called as a model
    factory without a ``-> nn.Module`` annotation; its result is still checked to be one."""
    if not inspect.isfunction(fn):
        return False
    target = inspect.unwrap(fn)
    module = sys.modules.get(getattr(target, "__module__", "") or "")
    top = (getattr(target, "__module__", "") or "").split(".")[0]
    # rankopt itself counts as a library even from a source checkout (its own functions
    # are annotated where they build a model)
    if module is None or top in sys.stdlib_module_names or top in ("builtins", "rankopt"):
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return False
    path = Path(file).resolve()
    if any(path.is_relative_to(d) for d in _library_dirs()):
        return False
    returns = inspect.signature(target).return_annotation
    return returns is inspect.Signature.empty


def not_found_message(where: str, spec: str, module_name: str, folder: str | None, exc: Exception) -> str:
    """One line: what was looked for where, and the two ways to make it found."""
    beside = f" ({folder})" if folder else ""
    top = module_name.split(".")[0]
    text = (f"{where}: cannot import module {module_name!r} named in {spec!r}: {LOOKUP_HINT}"
            f"{beside}; put {top}.py beside the study file or add its folder to PYTHONPATH")
    if not isinstance(exc, ModuleNotFoundError) or exc.name not in (module_name, top):
        text += f" ({type(exc).__name__}: {str(exc)[:80]})"
    return text
