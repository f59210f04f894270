"""Small layers, a tiny model and tiny data that the contract checks run plugins on.

Everything is deliberately small (a few hundred weights) so that the check of one
plugin costs what its method costs on tiny layers: a fraction of a second for
SVD-based decomposers, seconds for iterative ones (CP-ALS). Channel counts are composite (6, 8, 12)
so decomposers that factorize channels (TT, Tensor Ring) have something to factorize.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from rankopt.contract.dataset import DatasetSplits
from rankopt.testing._core import seeded

__all__ = [
    "SampleLayer",
    "sample_layers",
    "unsupported_probes",
    "tiny_model",
    "tiny_splits",
    "TINY_INPUT_SHAPE",
    "TINY_NUM_CLASSES",
]

TINY_INPUT_SHAPE: tuple[int, int, int, int] = (1, 3, 8, 8)
TINY_NUM_CLASSES = 4


@dataclass(frozen=True)
class SampleLayer:
    """A layer to run a decomposer on, and the spatial size of its input (None for Linear)."""

    name: str
    module: nn.Module
    input_hw: tuple[int, int] | None

    def example(self, batch: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A random input batch of the right shape (seeded by the caller)."""
        m = self.module
        if isinstance(m, nn.Linear):
            return torch.randn(batch, m.in_features, dtype=dtype)
        if isinstance(m, nn.Conv2d):
            assert self.input_hw is not None
            return torch.randn(batch, m.in_channels, *self.input_hw, dtype=dtype)
        raise TypeError(
            f"sample layer {self.name!r}: cannot make an input for {type(m).__name__}; "
            "pass Conv2d or Linear modules"
        )


_DEFAULT_SAMPLES: tuple[tuple[str, Callable[[], nn.Module], tuple[int, int] | None], ...] = (
    ("conv3x3", lambda: nn.Conv2d(6, 8, 3, padding=1), (6, 6)),
    ("conv3x3_stride2_nobias", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (7, 7)),
    ("conv1x1", lambda: nn.Conv2d(8, 4, 1), (5, 5)),
    ("conv1x3", lambda: nn.Conv2d(4, 6, (1, 3), padding=(0, 1)), (5, 6)),
    # each geometry below changes the output shape or values when a build() drops it,
    # and the input is not square, so swapping height and width shows too
    ("conv3x3_dilation2x1", lambda: nn.Conv2d(4, 6, 3, padding=(2, 1), dilation=(2, 1)), (7, 6)),
    ("conv3x3_stride2x1", lambda: nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1), (7, 6)),
    ("conv3x2_pad2x1_odd_channels", lambda: nn.Conv2d(5, 7, (3, 2), padding=(2, 1)), (5, 6)),
    ("linear", lambda: nn.Linear(12, 10), None),
)
"""The default layers: (name, factory, input (H, W)). Together they cover 1x1, square and
non-square kernels, stride 2 and anisotropic stride (2, 1), dilation (2, 1), padding
larger than the kernel's half, layers with and without bias, odd (prime) channel counts
and a Linear layer."""


def sample_layers(
    modules: Sequence[nn.Module] | Mapping[str, nn.Module] | None = None,
    *,
    input_hw: tuple[int, int] = (8, 8),
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> list[SampleLayer]:
    """The layers to check: the given ``modules`` (copied) or the default small set.

    Weights are re-drawn from a seeded generator and cast to ``dtype`` so that
    equivalence can be checked in float64. ``input_hw`` is the input size used for
    the given Conv2d modules.
    """
    import copy

    if modules is None:
        with seeded(seed):  # constructing the modules draws from torch's RNG
            items = [(n, make(), hw) for n, make, hw in _DEFAULT_SAMPLES]
    else:
        named = modules.items() if isinstance(modules, Mapping) else (
            (f"{type(m).__name__.lower()}_{i}", m) for i, m in enumerate(modules)
        )
        items = [
            (str(n), copy.deepcopy(m), tuple(input_hw) if isinstance(m, nn.Conv2d) else None)
            for n, m in named
        ]
    out = []
    with seeded(seed):
        for name, module, hw in items:
            module = module.to(dtype=dtype)
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(torch.randn_like(p) / max(1.0, p[0].numel() ** 0.5))
            out.append(SampleLayer(name, module.eval(), hw))  # type: ignore[arg-type]
    return out


def unsupported_probes() -> list[SampleLayer]:
    """Modules no low-rank layer decomposer should accept as its own conv/linear kind.

    A decomposer is expected to refuse those of them its ``supports()`` rejects.
    """
    return [
        SampleLayer("grouped_conv", nn.Conv2d(4, 4, 3, groups=2), (6, 6)),
        SampleLayer("depthwise_conv", nn.Conv2d(4, 4, 3, groups=4), (6, 6)),
        SampleLayer("conv1d", nn.Conv1d(4, 6, 3), None),
        SampleLayer("reflect_padded_conv", nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (6, 6)),
        SampleLayer("batchnorm", nn.BatchNorm2d(4), None),
        SampleLayer("linear", nn.Linear(12, 10), None),
        SampleLayer("conv2d", nn.Conv2d(6, 8, 3), (6, 6)),
    ]


def tiny_model(num_classes: int = TINY_NUM_CLASSES) -> nn.Module:
    """Two 3x3 convs, global pooling and a Linear head, for (3, 8, 8) inputs (3k weights)."""
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def tiny_splits(n_train: int = 32, n_val: int = 16, seed: int = 0) -> DatasetSplits:
    """Synthetic, learnable 4-class data of shape (3, 8, 8): each class has its own mean image."""
    c, h, w = TINY_INPUT_SHAPE[1:]
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(TINY_NUM_CLASSES, c, h, w, generator=gen)

    def draw(n: int) -> TensorDataset:
        y = torch.arange(n) % TINY_NUM_CLASSES
        x = means[y] + 0.5 * torch.randn(n, c, h, w, generator=gen)
        return TensorDataset(x, y)

    return DatasetSplits(
        train=draw(n_train), val=draw(n_val), num_classes=TINY_NUM_CLASSES, input_shape=(c, h, w)
    )
