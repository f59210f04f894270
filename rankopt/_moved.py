"""The module paths of the flat layout before the layer subpackages (issue 31).

``import rankopt.compression.surgery`` still works: it gives ``rankopt.compression.surgery`` itself
(the same module object, so monkeypatching either name patches both) with a
DeprecationWarning naming the new path. The old paths that are packages now
(``rankopt.config.schema``, ``rankopt.training.loop``, ``rankopt.results.reading``, ``rankopt.deploy.exporting``)
re-export their old names from their ``__init__`` instead.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

# old path -> new path, both below ``rankopt.``
_MOVES: dict[str, str] = {
    "errors": "core.errors",
    "records": "core.records",
    "hookspecs": "contract.hookspecs",
    "manager": "contract.manager",
    "surgery": "compression.surgery",
    "accounting": "compression.accounting",
    "spectral": "compression.spectral",
    "selection": "compression.selection",
    "latency": "compression.latency",
    "distill": "training.distill",
    "trial": "training.trial",
    "devices": "training.devices",
    "config_checks": "config.checks",
    "config_sections": "config.sections",
    "config_yaml": "config.yaml_io",
    "cli.inspect_cmd": "results.layer_table",
    "plugins.decomposers.base": "contract.decomposer",
    "plugins.selectors.base": "contract.selector",
    "plugins.strategies.base": "contract.strategy",
    "plugins.datasets.base": "contract.dataset",
    "artifacts": "deploy.artifacts",
    "evaluation": "results.evaluation",
    "report": "results.report",
}
MOVED: dict[str, str] = {f"rankopt.{old}": f"rankopt.{new}" for old, new in _MOVES.items()}


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; import it from there (or the name from rankopt)",
            DeprecationWarning,
            stacklevel=2,  # the warnings module skips importlib's own frames
        )
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the new module is already executed


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader(new))


def install() -> None:
    """Serve the old paths (once per process)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())  # before path finders: a stale old file never wins
