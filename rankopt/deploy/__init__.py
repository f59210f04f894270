"""Deployment: compressed-model files (artifacts), export to ONNX/TorchScript, densify.

``rankopt.deploy.exporting`` was one module before; its names are still importable from here.
"""

from __future__ import annotations

from typing import Any

from rankopt.deploy import exporting as _exporting
from rankopt.deploy.exporting import *  # noqa: F403
from rankopt.deploy.exporting import __all__


def __getattr__(name: str) -> Any:
    # the names the old module held beyond its __all__
    try:
        return getattr(_exporting, name)
    except AttributeError:
        raise AttributeError(f"module 'rankopt.deploy.exporting' has no attribute {name!r}") from None
