"""Training: the loop, distillation, the trial context and devices.

Before the layer packages this was one module; its names are still importable from here.
"""

from rankopt.training import loop as _old
from rankopt.training.loop import *  # noqa: F403
from rankopt.training.loop import __all__


def __getattr__(name: str) -> object:  # the old module's names beyond its __all__
    return getattr(_old, name)
