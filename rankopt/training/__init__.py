"""Training: the loop, distillation, the trial context and devices.

``rankopt.training.loop`` was one module before; its names are still importable from here.
"""

from __future__ import annotations

from typing import Any

from rankopt.training import loop as _loop
from rankopt.training.loop import *  # noqa: F403
from rankopt.training.loop import __all__


def __getattr__(name: str) -> Any:
    # the names the old module held beyond its __all__
    try:
        return getattr(_loop, name)
    except AttributeError:
        raise AttributeError(f"module 'rankopt.training.loop' has no attribute {name!r}") from None
