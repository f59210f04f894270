"""Study configuration: the schema, its sections, checks and YAML reading.

Before the layer packages this was one module; its names are still importable from here.
"""

from rankopt.config import schema as _old
from rankopt.config.schema import *  # noqa: F403
from rankopt.config.schema import __all__


def __getattr__(name: str) -> object:  # the old module's names beyond its __all__
    return getattr(_old, name)
