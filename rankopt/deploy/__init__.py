"""Deployment: compressed-model files (artifacts), export to ONNX/TorchScript, densify.

Before the layer packages this was one module; its names are still importable from here.
"""

from rankopt.deploy import exporting as _old
from rankopt.deploy.exporting import *  # noqa: F403
from rankopt.deploy.exporting import __all__


def __getattr__(name: str) -> object:  # the old module's names beyond its __all__
    return getattr(_old, name)
