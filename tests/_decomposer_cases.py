"""Layer shapes and helpers shared by the decomposer tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], nn.Module]
    input_hw: tuple[int, int] | None  # None for Linear

    def module(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make().double()

    def example(self, module: nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if isinstance(module, nn.Linear):
            return torch.randn(batch, module.in_features, generator=g, dtype=torch.float64)
        assert self.input_hw is not None
        return torch.randn(batch, module.in_channels, *self.input_hw, generator=g, dtype=torch.float64)


CONV_CASES = [
    Case("k3_p1_bias", lambda: nn.Conv2d(4, 6, 3, padding=1), (9, 11)),
    Case("k3_stride2_p0_nobias", lambda: nn.Conv2d(6, 4, 3, stride=2, bias=False), (9, 11)),
    Case("k3x5_p1x2_bias", lambda: nn.Conv2d(4, 6, (3, 5), padding=(1, 2)), (8, 9)),
    Case("k3_same_dil2_nobias", lambda: nn.Conv2d(4, 8, 3, padding="same", dilation=2, bias=False), (9, 10)),
    Case(
        "k3x5_stride2_p1x2_dil2_bias",
        lambda: nn.Conv2d(6, 4, (3, 5), stride=2, padding=(1, 2), dilation=2),
        (11, 13),
    ),
    Case("k2x4_same_even_bias", lambda: nn.Conv2d(4, 6, (2, 4), padding="same"), (7, 9)),
    Case("k3_valid_bias", lambda: nn.Conv2d(8, 4, 3, padding="valid"), (7, 8)),
    Case("k1_bias", lambda: nn.Conv2d(6, 8, 1), (5, 6)),
    # odd and prime channel counts: TT factors 15 = 3 x 5, 9 = 3 x 3; 7 and 13 stay whole
    Case("k3_odd_15to9_nobias", lambda: nn.Conv2d(15, 9, 3, padding=1, bias=False), (7, 9)),
    Case("k3_prime_7to13_bias", lambda: nn.Conv2d(7, 13, 3, stride=2), (9, 8)),
]
LINEAR_CASES = [
    Case("linear_bias", lambda: nn.Linear(12, 10), None),
    Case("linear_nobias", lambda: nn.Linear(10, 12, bias=False), None),
]


def ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flops_of(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def half(ranks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(max(1, r // 2) for r in ranks)


def with_cp_rank(module: nn.Module, rank: int, seed: int = 0) -> nn.Module:
    """``module`` with its kernel replaced by one of CP rank ``rank``."""
    g = torch.Generator().manual_seed(seed)
    t, s, kh, kw = module.weight.shape
    factors = [torch.randn(n, rank, generator=g, dtype=torch.float64) for n in (t, s, kh, kw)]
    with torch.no_grad():
        module.weight.copy_(torch.einsum("tr,sr,hr,wr->tshw", *factors))
    return module


