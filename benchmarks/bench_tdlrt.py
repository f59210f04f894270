"""TDLRT: rank growth, init random against reference, and time per step against dense training.

1. Rank growth: a 32->32 3x3 layer trained (MSE, SGD lr 0.5, batch 16, 300 steps) towards
   a kernel of Tucker-2 ranks (16, 16), started at rank 2 from a small random core, tau 0.1:
   the paper's integrator (default, remainder dropped) at tau 0.1 and 0.02, and
   ``carry_truncated`` (remainder kept in the pending update) at tau 0.1.
2. The strategy on small_cnn / digits (the tests' reference), 2 epochs, tau 0.1:
   ``init: reference`` (default) against ``init: random`` (the paper), and ``preset: paper``.
3. Time per training step (forward, backward, SGD step, integration) of a TDLRT layer
   against a dense Conv2d at the same batch (64->64 3x3, 16x16 input, batch 32, ranks
   16/16), median of 30 interleaved rounds, process CPU time, 1 thread; and the bytes the
   layer holds for training (parameters, their gradients, buffers). TDLRT here convolves
   with the reconstructed kernel (not the three factor convolutions), so its activations
   are those of dense training.

Run: ``.venv/bin/python benchmarks/bench_tdlrt.py --record`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _record import invocation, markdown_table, record  # noqa: E402

import rankopt  # noqa: E402
from rankopt.plugins.strategies._tdlrt_layers import TuckerTrainingConv2d  # noqa: E402


def growth(carry: bool, tau: float = 0.1, steps: int = 300) -> list[tuple[int, tuple[int, int]]]:
    from strategies_support import grow_from_rank_2

    return grow_from_rank_2(tau, carry, steps, record_at=(25, 50, 100, 200, 300))[2]


def strategy_rows() -> list[list[str]]:
    from strategies_support import make_context

    rows = []
    for label, params in (("init: reference (default)", {}), ("init: random", {"init": "random"}),
                          ("preset: paper", {"preset": "paper"}),
                          ("init: reference, carry_truncated", {"carry_truncated": True})):
        ctx = make_context()
        start = time.process_time()
        outcome = rankopt.strategy("tdlrt").run(ctx, {**params, "tau": 0.1, "epochs": 2.0})
        ranks = ", ".join(f"{n} {tuple(e['ranks'])}" for n, e in outcome.spec.items()) or "(none)"
        params_count = rankopt.count(outcome.model, input_shape=(1, 1, 8, 8)).params
        rows.append([label, ranks, f"{params_count:,}", f"{ctx.evaluate(outcome.model):.4f}",
                     f"{time.process_time() - start:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def step_times(rounds: int = 30) -> tuple[float, float, int, int]:
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    dense = nn.Conv2d(64, 64, 3, padding=1)
    built = rankopt.decomposer("tucker2").build(conv, (16, 16))
    from rankopt.plugins.strategies._tdlrt_layers import tucker2_convs

    first, middle, last = tucker2_convs(built)
    layer = TuckerTrainingConv2d.from_factors(
        conv, middle.weight.detach(), last.weight.detach()[:, :, 0, 0],
        first.weight.detach()[:, :, 0, 0].T, conv.bias, max_ranks=(64, 64),
    )
    x = torch.randn(32, 64, 16, 16)
    opt_d = torch.optim.SGD(dense.parameters(), lr=1e-3, momentum=0.9)
    opt_t = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9)

    def dense_step() -> None:
        opt_d.zero_grad()
        dense(x).square().mean().backward()
        opt_d.step()

    def tdlrt_step() -> None:
        opt_t.zero_grad()
        layer(x).square().mean().backward()
        opt_t.step()
        layer.integrate(0.05, carry=True)

    times: dict[str, list[float]] = {"dense": [], "tdlrt": []}
    for _ in range(3):
        dense_step()
        tdlrt_step()
    for _ in range(rounds):
        order = [("dense", dense_step), ("tdlrt", tdlrt_step)]
        random.shuffle(order)
        for name, fn in order:
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)

    def held(module: nn.Module, opt: torch.optim.Optimizer) -> int:
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        buffers = sum(b.numel() * b.element_size() for b in module.buffers())
        momentum = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                       if torch.is_tensor(v))
        return 2 * params + buffers + momentum  # parameters, their gradients, buffers, momentum

    return (statistics.median(times["dense"]), statistics.median(times["tdlrt"]),
            held(dense, opt_d), held(layer, opt_t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = [growth(False, 0.1), growth(False, 0.02), growth(True, 0.1)]
    part1 = markdown_table(
        ["step", "paper's integrator (default), tau 0.1", "paper's integrator, tau 0.02",
         "carry_truncated, tau 0.1"],
        [[str(a[0]), str(a[1]), str(b[1]), str(c[1])] for a, b, c in zip(*runs)],
    )
    print(part1)
    part2 = markdown_table(["small_cnn / digits, tau 0.1, 2 epochs", "learned ranks (r_in, r_out)", "params",
                            "accuracy", "CPU s"], strategy_rows())
    dense_s, tdlrt_s, dense_b, tdlrt_b = step_times()
    part3 = markdown_table(
        ["64->64 3x3, 16x16, batch 32", "ms per step (median)", "bytes held (params, grads, buffers, momentum)"],
        [["dense Conv2d", f"{dense_s * 1e3:.2f}", f"{dense_b:,}"],
         ["TDLRT layer, ranks 16/16", f"{tdlrt_s * 1e3:.2f} ({tdlrt_s / dense_s:.2f}x dense)", f"{tdlrt_b:,}"]],
    )
    load = "%.2f, %.2f, %.2f" % os.getloadavg()
    table = (
        "1. Rank growth from rank 2 (tau's rank for the target is 16 at both tau):\n\n" + part1
        + "\n\n2. The strategy, init reference against random:\n\n" + part2
        + "\n\n3. Time per step and memory against dense training (TDLRT still convolves with the "
        "reconstructed kernel: the factored forward of the paper is not implemented, so it costs more "
        "than dense, not less):\n\n" + part3
        + f"\n\nProcess CPU time, 1 thread. Load average: {load} (machine shared by nine engineers).\n"
    )
    print(table)
    if args.record:
        record("TDLRT rank growth, init, time per step (bench_tdlrt)", table, invocation())


if __name__ == "__main__":
    main()
