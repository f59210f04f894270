"""Upper bounds on sizes that would otherwise mean "for ever" (or "all the memory").

A study file or a command-line value beyond these is refused before any work, with the
field, the value and the allowed range. They are far above any real use (ResNet-152 on
ImageNet has 60 M parameters; a long fine-tune is a few hundred epochs) and exist so
that a typo (``epochs: 1e9``, ``width: 100000``) fails in one line instead of running
for years or dying in the allocator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rankopt.core.errors import ConfigError

__all__ = ["MAX_EPOCHS", "MAX_RANK_MULTIPLE", "MAX_MODEL_PARAMS", "MAX_INPUT_ELEMENTS",
           "check_input_shape", "check_model_size", "check_size_on_meta"]

MAX_EPOCHS = 10_000  # any epochs setting: reference, strategies, multi_fidelity, train
MAX_RANK_MULTIPLE = 4096  # wider than any SIMD/tensor-core tile
MAX_MODEL_PARAMS = 2**31  # 8 GiB of float32 weights
MAX_INPUT_ELEMENTS = 2**28  # one input batch of 1 GiB float32


def check_input_shape(shape: Sequence[int], where: str) -> None:
    """Refuse an input shape of more than :data:`MAX_INPUT_ELEMENTS` elements."""
    n = math.prod(int(d) for d in shape)
    if n > MAX_INPUT_ELEMENTS:
        raise ConfigError(
            f"{where}: {','.join(str(d) for d in shape)} is {n:,} elements per batch, above the "
            f"limit of {MAX_INPUT_ELEMENTS:,} (1 GiB of float32); give a smaller shape"
        )


def check_model_size(params: int, where: str, value: object) -> None:
    """Refuse a model of more than :data:`MAX_MODEL_PARAMS` parameters."""
    if params > MAX_MODEL_PARAMS:
        raise ConfigError(
            f"{where}: {value!r} builds a model of {params:,} parameters, above the limit of "
            f"{MAX_MODEL_PARAMS:,} (8 GiB of float32); give smaller sizes"
        )


def check_size_on_meta(factory: Callable[..., Any], kwargs: Mapping[str, Any], where: str) -> None:
    """Build ``factory(**kwargs)`` on PyTorch's meta device first (no memory) and refuse a
    model above :data:`MAX_MODEL_PARAMS`, so that ``width: 100000`` fails in one line
    instead of in the allocator. A factory that cannot build on meta is left to the real
    build, which reports its own error."""
    import torch

    try:
        with torch.device("meta"):
            meta = factory(**kwargs)
        params = sum(t.numel() for t in meta.parameters()) if isinstance(meta, torch.nn.Module) else 0
    except Exception:  # noqa: BLE001 - not meta-safe: the real build says what is wrong
        return
    check_model_size(params, where, dict(kwargs))
