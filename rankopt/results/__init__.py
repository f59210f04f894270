"""Results: reading a run directory, held-out evaluation, the report.

``rankopt.results.reading`` was one module before; its names are still importable from here.
"""

from __future__ import annotations

from typing import Any

from rankopt.results import reading as _reading
from rankopt.results.reading import *  # noqa: F403
from rankopt.results.reading import __all__


def __getattr__(name: str) -> Any:
    # the names the old module held beyond its __all__
    try:
        return getattr(_reading, name)
    except AttributeError:
        raise AttributeError(f"module 'rankopt.results.reading' has no attribute {name!r}") from None
