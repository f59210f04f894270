"""Decomposer benchmark: decomposition time on ResNet-18, and CPU latency of factorized convs.

Run: ``.venv/bin/python benchmarks/bench_decomposers.py`` (about 4 minutes on 2 CPUs).

1. Seconds to decompose every 3x3 conv of torchvision's resnet18 (num_classes=10) with
   each decomposer: Tucker-2 at half ranks, SVD at half rank, TT at half of each bond's
   largest rank (default channel factorization), CP at the R whose parameter count is
   closest to Tucker-2's at half ranks. Each decomposer starts from an empty spectral
   cache; "warm" repeats Tucker-2 with the SVDs cached (what later trials of a study see).
2. For each distinct 3x3 conv shape of a CIFAR ResNet-18 (batch 32, 32x32 input): the
   median latency of the original conv and of each factorized module at 25 % and 50 %
   ranks (CP: the Tucker-2 parameter-parity R at that fraction), and the ratio of the
   measured speed-up to the FLOP reduction (1.0: the module runs as fast as its FLOPs
   promise; below 1: slower than its FLOPs suggest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

import rankopt  # noqa: E402
from rankopt.compression.accounting import layer_cost  # noqa: E402
from rankopt.compression.spectral import SpectralCache, set_default_cache  # noqa: E402
from rankopt.compression.surgery import find_layers  # noqa: E402

DECOMPOSERS = ("tucker2", "cp", "tt", "svd")
# (S, T, output H = W, stride) of the 3x3 convs of a CIFAR ResNet-18 at a 32x32 input
CIFAR_RESNET18_SHAPES = [
    (64, 64, 32, 1),
    (64, 128, 16, 2),
    (128, 128, 16, 1),
    (128, 256, 8, 2),
    (256, 256, 8, 1),
    (256, 512, 4, 2),
    (512, 512, 4, 1),
]


def fraction_ranks(dec: rankopt.Decomposer, conv: nn.Conv2d, fraction: float) -> tuple[int, ...]:
    """``fraction`` of each largest rank (CP: the Tucker-2 parameter-parity R at ``fraction``)."""
    if dec.name == "cp":
        tucker = rankopt.decomposer("tucker2")
        t_ranks = fraction_ranks(tucker, conv, fraction)
        s, t = conv.in_channels, conv.out_channels
        kh, kw = conv.kernel_size
        t_params = s * t_ranks[0] + t_ranks[0] * t_ranks[1] * kh * kw + t_ranks[1] * t
        return (max(1, min(round(t_params / (s + t + kh + kw)), dec.max_ranks(conv)[0])),)
    return tuple(max(1, round(fraction * r)) for r in dec.max_ranks(conv))


def decompose_resnet18(cp_iters: int) -> str:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    layers = [
        (info, model.get_submodule(info.name))
        for info in find_layers(model, (1, 3, 32, 32))
        if info.kind == "conv2d" and info.kernel_size == (3, 3)
    ]
    dense_params = sum(info.cost.params for info, _ in layers)
    rows = []
    runs = [(name, False) for name in DECOMPOSERS] + [("tucker2", True)]
    for name, warm in runs:
        dec = rankopt.decomposer(name)
        options = {"n_iter_max": cp_iters} if name == "cp" else None
        if not warm:
            set_default_cache(SpectralCache())
        errors, params = [], 0
        start = time.perf_counter()
        for info, conv in layers:
            ranks = fraction_ranks(dec, conv, 0.5)
            built = dec.build(conv, ranks, options=options)
            with torch.no_grad():
                w = conv.weight
                errors.append(float((built.reconstruct_weight() - w).norm() / w.norm()))
            params += dec.cost(conv, ranks, info.input_hw, options).params
        seconds = time.perf_counter() - start
        label = f"{name} (warm cache)" if warm else name
        rule = {
            "tucker2": "half ranks",
            "svd": "half rank",
            "tt": "half of each bond's max",
            "cp": f"Tucker-2 param parity, {cp_iters} ALS iterations",
        }[name]
        rows.append(
            f"| {label} | {rule} | {seconds:.1f} | {params:,} | {dense_params / params:.2f}x "
            f"| {statistics.mean(errors):.3f} |"
        )
    header = (
        f"Decomposing the {len(layers)} 3x3 convs of torchvision resnet18 (num_classes=10), "
        f"{dense_params:,} params dense.\n\n"
        "| decomposer | ranks | seconds | params | compression | mean rel. weight error |\n"
        "|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(rows) + "\n"


def median_seconds(module: nn.Module, x: torch.Tensor, budget: float = 1.5) -> float:
    with torch.inference_mode():
        for _ in range(2):  # warm-up (allocator, kernel selection)
            module(x)
        start = time.perf_counter()
        module(x)
        once = time.perf_counter() - start
        repeats = max(5, min(25, int(budget / max(once, 1e-4))))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def randomized(module: nn.Module) -> nn.Module:
    """Fill a structure-only module with small random values (latency must not see zeros)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.05)
    return module.eval()


def latency_table(batch: int) -> str:
    torch.manual_seed(0)
    lines = [
        "| conv (S -> T, out HxW, stride) | dense ms | decomposer | ranks at 25 % | ms | speed-up | FLOP red. "
        "| speed-up / FLOP red. | ranks at 50 % | ms | speed-up | FLOP red. | speed-up / FLOP red. |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s, t, out, stride in CIFAR_RESNET18_SHAPES:
        conv = randomized(nn.Conv2d(s, t, 3, stride=stride, padding=1, bias=False))
        hw = (out * stride, out * stride)
        x = torch.randn(batch, s, *hw)
        dense_s = median_seconds(conv, x)
        dense_flops = layer_cost(conv, hw).flops
        for i, name in enumerate(DECOMPOSERS):
            dec = rankopt.decomposer(name)
            cells = []
            for fraction in (0.25, 0.5):
                ranks = fraction_ranks(dec, conv, fraction)
                module = randomized(dec.build(conv, ranks, initialize=False))
                seconds = median_seconds(module, x)
                speedup = dense_s / seconds
                reduction = dense_flops / dec.cost(conv, ranks, hw).flops
                cells.append(
                    f"{list(ranks)} | {seconds * 1e3:.1f} | {speedup:.2f}x | {reduction:.2f}x | {speedup / reduction:.2f}"
                )
            first = f"{s} -> {t}, {out}x{out}, s{stride} | {dense_s * 1e3:.1f}" if i == 0 else " | "
            lines.append(f"| {first} | {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cp-iters", type=int, default=20, help="CP-ALS iterations in part 1 (default option: 200)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady figures on a shared CPU)")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    part1 = decompose_resnet18(args.cp_iters)
    print(part1)
    part2 = latency_table(args.batch)
    print(part2)
    notes = (
        f"CPU, torch threads = {args.threads}, float32. Part 2: batch {args.batch}, torch.inference_mode, "
        "median of 5-25 runs after 2 warm-ups; the input is the output size times the stride; "
        "modules built structure-only and filled with random values (latency does not depend on them). "
        "CP's R is the Tucker-2 parameter-parity rank at the same fraction, as in part 1.\n\n"
    )
    command = ".venv/bin/python benchmarks/bench_decomposers.py" + "".join(
        f" {a}" for a in sys.argv[1:]
    )
    if not args.no_record:
        record("Decomposers: decomposition time and factorized-conv latency", notes + part1 + "\n" + part2, command)


if __name__ == "__main__":
    main()
