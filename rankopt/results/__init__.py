"""Results: reading a run directory, held-out evaluation, the report.

Before the layer packages this was one module; its names are still importable from here.
"""

from rankopt.results import reading as _old
from rankopt.results.reading import *  # noqa: F403
from rankopt.results.reading import __all__


def __getattr__(name: str) -> object:  # the old module's names beyond its __all__
    return getattr(_old, name)
