"""The entry-point module: rankopt loads it from ``[project.entry-points.rankopt]``."""

from __future__ import annotations

from rankopt import DecomposerInfo, hookimpl
from rankopt_tensor_ring.decomposer import TensorRingDecomposer

__all__ = ["rankopt_decomposers"]


@hookimpl
def rankopt_decomposers() -> list[DecomposerInfo]:
    return [DecomposerInfo("tensor_ring", TensorRingDecomposer, TensorRingDecomposer.description)]
