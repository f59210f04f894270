"""Tiling-based SVD on a 1024 x 1024 Gaussian matrix at 4x compression (DeepTwist, seeds/002 section 4.2).

The seed's experiment: a 1024 x 1024 matrix of N(0, 1) entries, cut into 1 x 1, 16 x 16
or 128 x 128 tiles (tiles of 1024, 64 or 8 on a side), each tile compressed by its own
truncated SVD so that all three keep a quarter of the parameters: ``r * (a*n + b*m) =
1024^2 / 4`` gives ranks 128, 8 and 1. Its observation: more tiles give more near-zero
and more large weights in the low-rank matrix. Reported: relative Frobenius error, and
the distribution of the reconstructed weights against the original's sigma (std,
shares of |w| under 0.1 sigma and over 2 sigma, excess kurtosis), with the
reference counts of the Gaussian itself.

Uses the ``svd`` decomposer's ``tiles`` option (``project`` and ``cost``). No timings.
Run: ``.venv/bin/python benchmarks/bench_tiled_svd.py`` (``--quick``: 256 x 256, records nothing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rankopt  # noqa: E402
from _record import markdown_table  # noqa: E402

TITLE = "Tiling-based SVD on a Gaussian matrix at 4x (DeepTwist section 4.2)"


def stats(w: torch.Tensor, sigma: float) -> list[str]:
    a = w.abs()
    z = (w - w.mean()) / w.std()
    return [
        f"{float(w.std()) / sigma:.3f}",
        f"{float((a < 0.1 * sigma).double().mean()):.2%}",
        f"{float((a > 2 * sigma).double().mean()):.2%}",
        f"{float((z ** 4).mean()) - 3:.2f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 x 256, records nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n = 256 if args.quick else 1024
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(n, n, generator=gen, dtype=torch.float64)
    layer = nn.Linear(n, n, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
    sigma = float(weight.std())
    dec = rankopt.decomposer("svd")
    dense = n * n
    rows = [["original", "-", "-", f"{dense:,}", "-", *stats(weight, sigma)]]
    for tiles in (1, 16, 128) if not args.quick else (1, 4, 32):
        side = n // tiles
        rank = dense // 4 // (2 * n * tiles)  # r * (a*n + b*m) = n^2 / 4 with a = b = tiles
        options = {"tiles": [tiles, tiles]}
        params = dec.cost(layer, (rank,), options=options).params
        approx = dec.project(weight, (rank,), options)
        error = float((approx - weight).norm() / weight.norm())
        rows.append([f"{tiles} x {tiles} tiles ({side} x {side})", str(rank), f"{dense / params:.2f}x",
                     f"{params:,}", f"{error:.4f}", *stats(approx, sigma)])
        print(" | ".join(rows[-1]), flush=True)
    header = ["tiling", "rank per tile", "compression", "params", "rel. error",
              "std / sigma", "share abs(w) < 0.1 sigma", "share abs(w) > 2 sigma", "excess kurtosis"]
    table = "\n".join([
        f"A {n} x {n} matrix of N(0, 1) entries (seed 0), each tile by its own truncated SVD "
        "(`svd` decomposer, option `tiles`), all at 4x fewer parameters; weight shares are "
        "against the original's sigma. No timings, so the machine's load does not matter.",
        "",
        markdown_table(header, rows),
    ])
    print(table)
    if not args.quick:
        from _record import record

        record(TITLE, table, ".venv/bin/python benchmarks/bench_tiled_svd.py")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
