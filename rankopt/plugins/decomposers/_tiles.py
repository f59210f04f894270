"""Tiling-based SVD (DeepTwist, seeds/002 section 4.2): each tile of the weight matrix by its own SVD.

The matrix ``W: (m, n)`` (a Linear weight, or a conv kernel lowered to ``T x S*kh*kw``)
is cut into ``a`` row blocks and ``b`` column blocks (``a`` and ``b`` must divide the
sides: equal tiles, so one rank ``r`` suits every tile and at full rank each is exact;
unequal tiles would leave some rank of the smaller ones as zero padding), and tile ``(i, j)`` is replaced by its rank-``r`` truncated SVD
``U_ij V_ij^T``. The factorized layer groups the factors so that it runs as ``b + a``
matmuls: for each column block ``j`` the stacked ``V_ij^T`` of every row block map
``x_j`` to ``a`` r-vectors at once; for each row block ``i`` the side-by-side ``U_ij``
sum the ``b`` r-vectors meant for it. Params ``r * (a*n + b*m)``; FLOPs per sample (or
per conv output position) ``2 * r * (a*n + b*m)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankopt.core.errors import ConfigError
from rankopt.plugins.decomposers._layers import thin_svd

__all__ = [
    "TiledSVDConv2d", "TiledSVDLinear", "check_tiles", "tile_max_rank", "tile_sizes", "tiled_factors",
    "tiled_project",
]


def tile_sizes(length: int, parts: int) -> list[int]:
    """Block sizes of ``torch.tensor_split(range(length), parts)``: as equal as possible."""
    return [length // parts + (1 if k < length % parts else 0) for k in range(parts)]


def check_tiles(tiles: Any, shape: Sequence[int] | None = None) -> tuple[int, int] | None:
    """``tiles`` as ``(a, b)`` (None when untiled), or a :class:`ConfigError`."""
    if tiles is None:
        return None
    if (
        not isinstance(tiles, (list, tuple))
        or len(tiles) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in tiles)
    ):
        raise ConfigError(
            f"svd option tiles must be [row tiles, column tiles], two integers >= 1, got {tiles!r}"
        )
    a, b = int(tiles[0]), int(tiles[1])
    if shape is not None and (shape[0] % a or shape[1] % b):
        raise ConfigError(
            f"svd option tiles={[a, b]} must divide the {shape[0]} x {shape[1]} weight matrix "
            f"evenly (equal tiles, so one rank fits every tile and at full rank each is exact); "
            f"use divisors of {shape[0]} and of {shape[1]}"
        )
    return a, b


def tile_max_rank(shape: Sequence[int], tiles: tuple[int, int]) -> int:
    """The largest rank every tile has: the smallest tile side."""
    return min(min(tile_sizes(shape[0], tiles[0])), min(tile_sizes(shape[1], tiles[1])))


def _blocks(matrix: torch.Tensor, tiles: tuple[int, int]) -> list[list[torch.Tensor]]:
    rows = torch.split(matrix, tile_sizes(matrix.shape[0], tiles[0]), dim=0)
    return [list(torch.split(row, tile_sizes(matrix.shape[1], tiles[1]), dim=1)) for row in rows]


def tiled_project(matrix: torch.Tensor, rank: int, tiles: tuple[int, int]) -> torch.Tensor:
    """Each tile replaced by its rank-``rank`` truncated SVD, same shape as ``matrix``."""
    out = []
    for row in _blocks(matrix, tiles):
        parts = []
        for tile in row:
            u, s, vh = thin_svd(tile)
            parts.append((u[:, :rank] * s[:rank]) @ vh[:rank])
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out, dim=0)


def tiled_factors(
    matrix: torch.Tensor, rank: int, tiles: tuple[int, int], split: Any
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(firsts, seconds)``: per column block ``(a*r, n_j)``, per row block ``(m_i, b*r)``.

    ``split(u, s, vh)`` places the singular values (the svd decomposer's ``split`` option).
    """
    a, b = tiles
    first_parts: list[list[torch.Tensor]] = [[] for _ in range(b)]
    second_parts: list[list[torch.Tensor]] = [[] for _ in range(a)]
    for i, row in enumerate(_blocks(matrix, tiles)):
        for j, tile in enumerate(row):
            u, s, vh = thin_svd(tile)
            first, second = split(u[:, :rank], s[:rank], vh[:rank])
            first_parts[j].append(first)  # (r, n_j), row block i
            second_parts[i].append(second)  # (m_i, r), column block j
    return [torch.cat(p, dim=0) for p in first_parts], [torch.cat(p, dim=1) for p in second_parts]


class _TiledMatmul(nn.Module):
    """``y = W x`` with ``W`` in tiled low-rank form (see the module docstring)."""

    def __init__(
        self, rows: int, cols: int, rank: int, tiles: tuple[int, int], bias: bool, **kw: Any
    ) -> None:
        super().__init__()
        self.rank, self.tiles = rank, tiles
        self.row_sizes, self.col_sizes = tile_sizes(rows, tiles[0]), tile_sizes(cols, tiles[1])
        a, b = tiles
        self.firsts = nn.ParameterList(
            nn.Parameter(torch.empty(a * rank, n, **kw)) for n in self.col_sizes
        )
        self.seconds = nn.ParameterList(
            nn.Parameter(torch.empty(m, b * rank, **kw)) for m in self.row_sizes
        )
        self.bias = nn.Parameter(torch.zeros(rows, **kw)) if bias else None
        for p in [*self.firsts, *self.seconds]:
            nn.init.normal_(p, std=(1.0 / max(1, p.shape[1])) ** 0.5)

    def extra_repr(self) -> str:
        return f"rows={sum(self.row_sizes)}, cols={sum(self.col_sizes)}, rank={self.rank}, tiles={list(self.tiles)}"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (N, n) -> (N, m)``."""
        a, b = self.tiles
        r = self.rank
        parts = torch.split(x, self.col_sizes, dim=-1)
        # per column block: the r-vectors of every row block's tile, (N, a, r)
        hidden = [F.linear(xj, first).reshape(-1, a, r) for xj, first in zip(parts, self.firsts)]
        stacked = torch.stack(hidden, dim=1)  # (N, b, a, r)
        out = [
            F.linear(stacked[:, :, i, :].reshape(-1, b * r), second)
            for i, second in enumerate(self.seconds)
        ]
        y = torch.cat(out, dim=-1)
        return y if self.bias is None else y + self.bias

    def reconstruct_matrix(self) -> torch.Tensor:
        r = self.rank
        rows = []
        for i, second in enumerate(self.seconds):
            rows.append(torch.cat(
                [second[:, j * r:(j + 1) * r] @ first[i * r:(i + 1) * r] for j, first in enumerate(self.firsts)],
                dim=1,
            ))
        return torch.cat(rows, dim=0)

    @torch.no_grad()
    def load_factors(self, firsts: Sequence[torch.Tensor], seconds: Sequence[torch.Tensor]) -> None:
        for p, f in zip(self.firsts, firsts):
            p.copy_(f)
        for p, s in zip(self.seconds, seconds):
            p.copy_(s)


class TiledSVDLinear(_TiledMatmul):
    """A Linear whose weight is tiled low-rank (tiling-based SVD)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return self.matmul(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)

    def reconstruct_weight(self) -> torch.Tensor:
        return self.reconstruct_matrix()


class TiledSVDConv2d(_TiledMatmul):
    """A Conv2d run as im2col (``F.unfold``) then the tiled low-rank matmul on the lowered kernel."""

    def __init__(
        self, conv: nn.Conv2d, rank: int, tiles: tuple[int, int], **kw: Any
    ) -> None:
        if isinstance(conv.padding, str):
            raise ConfigError(
                f"svd option tiles runs a conv as im2col, which needs numeric padding; the layer "
                f"has padding={conv.padding!r}: give the conv explicit padding or drop tiles"
            )
        kh, kw_ = conv.kernel_size
        super().__init__(
            conv.out_channels, conv.in_channels * kh * kw_, rank, tiles, conv.bias is not None, **kw
        )
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        y = self.matmul(cols.transpose(1, 2).reshape(-1, cols.shape[1]))  # (N*L, T)
        return y.reshape(n, oh * ow, -1).transpose(1, 2).reshape(n, -1, oh, ow)

    def reconstruct_weight(self) -> torch.Tensor:
        return self.reconstruct_matrix().reshape(self.out_channels, self.in_channels, *self.kernel_size)
