"""TDLRT: rank growth, init random against reference, and memory and time per step against dense.

1. Rank growth: a 32->32 3x3 layer trained by SGD on the squared error (halved, summed over
   channels, so ``lr`` is the share of the error one step removes), batch 16, towards a
   kernel of Tucker-2 ranks (16, 16), started at rank 2 from a small random core. The
   paper's integrator (factored, default) at tau 0.1 with steps removing 3% and 25% of the
   error, at tau 0.2 and 0.3 with 50%, and ``carry_truncated`` (kernel mode) at tau 0.1, 3%.
2. The strategy on small_cnn / digits (the tests' reference), 2 epochs, tau 0.1:
   ``init: reference`` (default) against ``init: random`` (the paper), ``preset: paper``,
   ``carry_truncated``, and a start at a tenth of the largest ranks with larger steps
   (the ranks grow).
3. Memory and time per training step (forward, backward, step, integration) of a TDLRT layer
   trained through its factors, of the kernel path (reconstructed kernel plus a dense
   ``delta``), and of a dense Conv2d, at the same batch (32) and input (16x16), for
   64->64 3x3 at ranks 16/16 and 256->256 3x3 at ranks 32/32. Median of interleaved rounds,
   process CPU time, 1 thread. Memory: bytes the layer holds across steps (parameters,
   gradients, buffers, SGD momentum, pending step gradients) and bytes saved for backward
   (the activation memory a training step keeps from forward to backward: distinct
   storages the autograd graph saves, parameters and buffers excluded).

Run: ``.venv/bin/python benchmarks/bench_tdlrt.py --record`` (about 4 minutes).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _record import invocation, markdown_table, record  # noqa: E402

import rankopt  # noqa: E402
from rankopt.plugins.strategies._tdlrt_layers import TuckerTrainingConv2d  # noqa: E402

GROWTH_RUNS = (  # (label, tau, lr, carry)
    ("paper's integrator, tau 0.1, step 3%", 0.1, 0.03, False),
    ("paper's integrator, tau 0.1, step 25%", 0.1, 0.25, False),
    ("paper's integrator, tau 0.2, step 50%", 0.2, 0.5, False),
    ("paper's integrator, tau 0.3, step 50%", 0.3, 0.5, False),
    ("carry_truncated, tau 0.1, step 3%", 0.1, 0.03, True),
)
GROWTH_STEPS = (10, 25, 50, 100, 200)


def growth() -> str:
    from strategies_support import grow_from_rank_2
    from test_strategy_tdlrt import _taus_rank

    columns, taus_rank = [], []
    for _label, tau, lr, carry in GROWTH_RUNS:
        target, _, history = grow_from_rank_2(tau, lr, GROWTH_STEPS[-1], carry=carry,
                                              record_at=GROWTH_STEPS)
        columns.append([str(r) for _, r in history])
        taus_rank.append(str(_taus_rank(target, tau)))
    rows = [[str(step)] + [col[k] for col in columns] for k, step in enumerate((0, *GROWTH_STEPS))]
    rows.append(["tau's rank for the target"] + taus_rank)
    return markdown_table(["step"] + [label for label, *_ in GROWTH_RUNS], rows)


def strategy_rows() -> list[list[str]]:
    from strategies_support import make_context

    rows = []
    for label, params in (("init: reference (default)", {}), ("init: random", {"init": "random"}),
                          ("preset: paper", {"preset": "paper"}),
                          ("init: reference, carry_truncated", {"carry_truncated": True}),
                          ("init: reference, start at 0.1 of the largest ranks (3 (4, 7), 7 (7, 7)), "
                           "lr 0.3", {"initial_rank_fraction": 0.1, "lr": 0.3})):
        ctx = make_context()
        start = time.process_time()
        outcome = rankopt.strategy("tdlrt").run(ctx, {**params, "tau": 0.1, "epochs": 2.0})
        ranks = ", ".join(f"{n} {tuple(e['ranks'])}" for n, e in outcome.spec.items()) or "(none)"
        params_count = rankopt.count(outcome.model, input_shape=(1, 1, 8, 8)).params
        rows.append([label, ranks, f"{params_count:,}", f"{ctx.evaluate(outcome.model):.4f}",
                     f"{time.process_time() - start:.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def _tensor_bytes(tensors) -> int:  # type: ignore[no-untyped-def]
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def _held(module: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Parameters, their gradients, buffers, optimizer state and pending step gradients."""
    params = list(module.parameters())
    pending = getattr(module, "_pending", None)
    pending_bytes = _tensor_bytes(vars(pending).values()) if pending is not None else 0
    return (_tensor_bytes(params) + _tensor_bytes(p.grad for p in params)
            + _tensor_bytes(module.buffers()) + pending_bytes
            + _tensor_bytes(v for s in opt.state.values() for v in s.values()))


def _saved_for_backward(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in forward, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    # a custom autograd Function's ctx.save_for_backward goes through the hooks too
    del out
    return sum(seen.values())


def step_costs(channels: int, rank: int, rounds: int) -> list[list[str]]:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    dense = nn.Conv2d(channels, channels, 3, padding=1)
    built = rankopt.decomposer("tucker2").build(conv, (rank, rank))
    from rankopt.plugins.strategies._tdlrt_layers import tucker2_convs

    first, middle, last = tucker2_convs(built)
    factors = (middle.weight.detach(), last.weight.detach()[:, :, 0, 0],
               first.weight.detach()[:, :, 0, 0].T, conv.bias)
    layers = {
        "dense": dense,
        "factored": TuckerTrainingConv2d.from_factors(conv, *factors, max_ranks=(channels, channels),
                                                      factored=True),
        "kernel": TuckerTrainingConv2d.from_factors(conv, *factors, max_ranks=(channels, channels)),
    }
    x = torch.randn(32, channels, 16, 16)
    lr, tau = 1e-3, 0.05
    opts = {name: torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
            for name, layer in layers.items()}

    def stepper(name: str) -> Callable[[], None]:
        layer, opt = layers[name], opts[name]

        def step() -> None:
            opt.zero_grad()
            layer(x).square().mean().backward()
            opt.step()
            if name != "dense":
                layer.integrate(tau, lr=lr)
        return step

    steps = {name: stepper(name) for name in layers}
    times: dict[str, list[float]] = {name: [] for name in layers}
    for _ in range(2):
        for fn in steps.values():
            fn()
    for _ in range(rounds):
        order = list(steps.items())
        random.shuffle(order)
        for name, fn in order:
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    # held after a backward, before integrate: the largest point between steps
    held = {}
    for name, layer in layers.items():
        opts[name].zero_grad()
        layer(x).square().mean().backward()
        held[name] = _held(layer, opts[name])
        opts[name].step()
        if name != "dense":
            layer.integrate(tau, lr=lr)
    saved = {name: _saved_for_backward(layer, x) for name, layer in layers.items()}
    for layer in layers.values():  # drop the pending gradients of the measuring forward
        layer.zero_grad(set_to_none=True)
    median = {name: statistics.median(v) for name, v in times.items()}
    labels = {"dense": "dense Conv2d",
              "factored": f"TDLRT, factored (default), ranks {rank}/{rank}",
              "kernel": f"TDLRT, kernel path (carry_truncated), ranks {rank}/{rank}"}
    rows = []
    for name in layers:
        rel = "" if name == "dense" else f" ({median[name] / median['dense']:.2f}x)"
        rows.append([f"{channels}->{channels}", labels[name], f"{median[name] * 1e3:.2f}{rel}",
                     f"{held[name]:,}" + ("" if name == "dense" else f" ({held[name] / held['dense']:.2f}x)"),
                     f"{saved[name]:,}" + ("" if name == "dense" else f" ({saved[name] / saved['dense']:.2f}x)")])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = "%.2f, %.2f, %.2f" % os.getloadavg()
    part1 = growth()
    print(part1, flush=True)
    part2 = markdown_table(["small_cnn / digits, tau 0.1, 2 epochs", "learned ranks (r_in, r_out)", "params",
                            "accuracy", "CPU s"], strategy_rows())
    rows = step_costs(64, 16, 2 * args.rounds) + step_costs(256, 32, args.rounds)
    part3 = markdown_table(
        ["layer (3x3, 16x16 input, batch 32)", "training", "ms per step (median; x dense)",
         "bytes held (params, grads, buffers, momentum, pending)", "bytes saved for backward"],
        rows,
    )
    load = "%.2f, %.2f, %.2f" % os.getloadavg()
    table = (
        "1. Rank growth from rank 2 (the paper's integrator, factored; `step` is the share of the "
        "error one SGD step removes). A rank grows only while one step's new directions carry more "
        "than tau * ||C||: the K- and L-step gradients vanish once the layer fits what its rank "
        "can (the rest of the gradient lies outside the tangent space), so small steps stay at "
        "rank 2 and large tau can stop short of tau's rank:\n\n" + part1
        + "\n\n2. The strategy, init reference against random:\n\n" + part2
        + "\n\n3. Memory and time per training step against dense training at the same batch "
        "(factored: forward and backward through the three factor convolutions, never the full "
        "kernel):\n\n" + part3
        + f"\n\nProcess CPU time, 1 thread, {args.rounds} interleaved rounds for 256 channels, "
        f"{2 * args.rounds} for 64. Load average: {load_before} at the start, {load} at the end "
        "(machine shared by six engineers).\n"
    )
    print(table)
    if args.record:
        record("TDLRT rank growth, init, time per step (bench_tdlrt)", table, invocation())


if __name__ == "__main__":
    main()
