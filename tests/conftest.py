"""Suite-wide settings.

Tiny models gain nothing from intra-op threads, and on 2 cores shared with Ray
workers they oversubscribe the CPU (tens of times slower), so tests use one thread.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# CLI tables are piped here: their width must not follow the terminal pytest runs in, nor
# the COLUMNS=80 / LINES=24 that pytest-xdist's workers are given (tests that want a
# width set COLUMNS themselves)
for _name in ("COLUMNS", "LINES"):
    os.environ.pop(_name, None)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
