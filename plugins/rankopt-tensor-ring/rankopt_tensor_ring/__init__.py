"""rankopt-tensor-ring: Tensor Ring conv layers (Wang et al., CVPR 2018) for rankopt.

Installing the distribution registers the ``tensor_ring`` decomposer through the
``rankopt`` entry-point group; study files and ``rankopt.decomposer("tensor_ring")``
then use it like a built-in.
"""

from __future__ import annotations

from rankopt_tensor_ring.decomposer import TensorRingDecomposer
from rankopt_tensor_ring.layer import TensorRingConv2d
from rankopt_tensor_ring.ring import balanced_factors, ring_max_ranks, tr_svd

__all__ = ["TensorRingDecomposer", "TensorRingConv2d", "balanced_factors", "ring_max_ranks", "tr_svd"]
__version__ = "0.1.0"
