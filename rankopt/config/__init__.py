"""Study configuration: the schema, its sections, checks and YAML reading.

``rankopt.config.schema`` was one module before; its names are still importable from here.
"""

from __future__ import annotations

from typing import Any

from rankopt.config import schema as _schema
from rankopt.config.schema import *  # noqa: F403
from rankopt.config.schema import __all__


def __getattr__(name: str) -> Any:
    # the names the old module held beyond its __all__
    try:
        return getattr(_schema, name)
    except AttributeError:
        raise AttributeError(f"module 'rankopt.config.schema' has no attribute {name!r}") from None
