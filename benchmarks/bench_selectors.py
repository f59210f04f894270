"""Seconds to select ranks for every conv of ResNet-18 with each rank selector.

Run: ``.venv/bin/python benchmarks/bench_selectors.py [--threads N]``

Torch runs on one thread by default (``--threads``): on a shared machine LAPACK's
OpenMP threads fight for the cores and a 512 x 4608 SVD then varies from 0.3 to 20 s.

torchvision's ResNet-18 (10 classes, seeded random initialization, 32x32 input),
Tucker-2 on its 20 convolutions (40 mode unfoldings, the largest 512 x 4608). Each
selector runs through :func:`rankopt.compression.selection.select_spec`:

* cold: an empty in-memory spectral cache (every unfolding's singular values computed);
* warm (memory): the same cache again;
* warm (disk): a new cache object on the directory the cold run filled, as a new
  trial process of the same study would see it.

A second table times the singular values of all 40 unfoldings computed directly,
to show why the cache decomposes the tall orientation of each matrix.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rankopt  # noqa: E402
from rankopt.compression.selection import select_spec  # noqa: E402
from rankopt.compression.spectral import SpectralCache  # noqa: E402

INPUT_SHAPE = (1, 3, 32, 32)
SELECTORS: list[tuple[str, dict]] = [
    ("vbmf", {}),
    ("energy", {"p": 0.95}),
    ("approx_ratio", {"ratio": 0.9}),
    ("fixed", {"fraction": 0.5}),
    ("budget", {"target": 0.5, "measure": "params"}),
    ("budget", {"target": 0.25, "measure": "flops", "method": "minmax"}),
]


def _model() -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return rankopt.model("resnet18", num_classes=10).eval()


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_selectors(model: torch.nn.Module) -> str:
    layers = rankopt.find_layers(model, INPUT_SHAPE)
    decomposers = {la.name: "tucker2" for la in layers if la.kind == "conv2d"}
    base = rankopt.count(model, INPUT_SHAPE)
    rows = [
        "| selector | params | cold s | SVDs | warm (memory) s | warm (disk) s | SVDs (disk) | layers compressed | params kept | FLOPs kept |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, params in SELECTORS:
        with tempfile.TemporaryDirectory() as tmp:
            cache = SpectralCache(tmp)

            def run(c: SpectralCache = cache) -> tuple:
                return select_spec(model, layers, decomposers, name, params, cache=c, input_shape=INPUT_SHAPE)

            cold, (spec, _) = _timed(run)
            cold_svds = cache.svd_calls
            warm, _ = _timed(run)
            disk_cache = SpectralCache(tmp)
            disk, _ = _timed(lambda: run(disk_cache))
        kept = rankopt.count(rankopt.compress(model, spec, initialize=False), INPUT_SHAPE)
        shown = ", ".join(f"{k}={v}" for k, v in params.items()) or "(defaults)"
        rows.append(
            f"| {name} | {shown} | {cold:.2f} | {cold_svds} | {warm:.2f} | {disk:.2f} | "
            f"{disk_cache.svd_calls} | {len(spec)}/{len(decomposers)} | "
            f"{kept.params / base.params:.3f} | {kept.flops / base.flops:.3f} |"
        )
        print(rows[-1], flush=True)
    return "\n".join(rows)


def bench_orientation(model: torch.nn.Module) -> str:
    dec = rankopt.decomposer("tucker2")
    mats = [
        m.detach().double()
        for la in rankopt.find_layers(model, INPUT_SHAPE)
        if la.kind == "conv2d"
        for m in dec.rank_matrices(model.get_submodule(la.name).weight)
    ]
    wide = sum(1 for m in mats if m.shape[0] < m.shape[1])
    ways = [
        ("torch.linalg.svdvals, matrix as given", lambda m: torch.linalg.svdvals(m)),
        ("torch.linalg.svdvals, tall orientation (the cache's way)",
         lambda m: torch.linalg.svdvals((m.T if m.shape[0] < m.shape[1] else m).contiguous())),
        ("torch.linalg.svd (thin), matrix as given", lambda m: torch.linalg.svd(m, full_matrices=False)),
        ("torch.linalg.svd (thin), tall orientation (the cache's way)",
         lambda m: torch.linalg.svd((m.T if m.shape[0] < m.shape[1] else m).contiguous(), full_matrices=False)),
    ]
    rows = [
        f"All {len(mats)} Tucker-2 unfoldings of the 20 convs ({wide} of them wide), float64:",
        "",
        "| method | seconds |",
        "|---|---|",
    ]
    for label, fn in ways:
        seconds, _ = _timed(lambda fn=fn: [fn(m) for m in mats])
        rows.append(f"| {label} | {seconds:.2f} |")
        print(rows[-1], flush=True)
    return "\n".join(rows)


def main() -> None:
    import argparse

    from _record import record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = ".venv/bin/python benchmarks/bench_selectors.py" + (
        f" --threads {args.threads}" if args.threads != 1 else ""
    )
    model = _model()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    note = (
        f"torchvision ResNet-18 (10 classes, seed 0, random init), Tucker-2 on the 20 convs, input "
        f"{list(INPUT_SHAPE)}; torch threads {torch.get_num_threads()}; 1-min load average at start "
        f"{load:.1f} (the machine is shared, so figures vary)."
    )
    table = bench_selectors(model)
    orientation = bench_orientation(model)
    record(
        "Rank selection on ResNet-18 (bench_selectors)",
        f"{note}\n\n{table}\n\n{orientation}\n",
        command,
    )


if __name__ == "__main__":
    main()
