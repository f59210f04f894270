"""ADMM (HODEC): the W - Z residual at the end of the regularized training, per decomposer and schedule.

small_cnn (width 32) trained 6 epochs on sklearn digits (the strategy tests' reference,
``tests/strategies_support.py``), energy selector p = 0.95 on the reference; ADMM 2
epochs, no fine-tuning. Rows: the default (``schedule: steps``, interval 20, rho 1, lr
0.01, Nesterov 0.9, tol 0.01: training stops once the residual is under it), the authors'
once-per-epoch schedule at the default rho/lr (``schedule: epoch``), and ``preset: paper``
(once per epoch, rho 1e-3, lr 0.1). The residual is ``max over layers ||W - Z|| / ||W||``.

A harder setting follows (on by default when ``../shared/data`` has MNIST): LeNet-5
trained 1 epoch on 8,000 MNIST images, fixed ranks at 0.25 of each mode's largest
(residual at the start 0.9-1.0), ADMM with the defaults (2 epochs of 125 steps,
interval 20: up to 12 Z/U updates), tucker2, cp and tt; the once-per-epoch schedule for
tucker2 and tt.

Run: ``.venv/bin/python benchmarks/bench_admm_residuals.py --record`` (about 10 minutes on a
loaded 2-CPU machine; CP-ALS projections and the MNIST training dominate).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _record import invocation, markdown_table, record  # noqa: E402
from strategies_support import make_context  # noqa: E402

import rankopt  # noqa: E402

MNIST_TRAIN = 8000

VARIANTS = (
    ("default (steps, interval 20, rho 1 x1.5 on a stall, lr 0.01)", {}),
    ("schedule: epoch (rho 1, lr 0.01)", {"schedule": "epoch"}),
    ("preset: paper (epoch, rho 1e-3, lr 0.1)", {"preset": "paper"}),
)


def mnist_rows(data: Path) -> list[list[str]]:
    from rankopt.training.loop import make_loader, seed_everything, train
    from rankopt.training.trial import LocalTrialContext

    splits = rankopt.dataset("npz", train="mnist_train.npz", val="mnist_test.npz", root=str(data),
                             limit={"train": MNIST_TRAIN, "val": 1000}, mean=0.1307, std=0.3081)
    seed_everything(0)
    reference = rankopt.model("lenet5")
    train(reference, make_loader(splits.train, batch_size=64, shuffle=True, seed=0), epochs=1, lr=0.05,
          device="cpu", seed=0)
    reference.eval()
    shape = (1, 1, 28, 28)
    targets = [t for t in rankopt.find_layers(reference, shape) if t.kind == "conv2d"]
    rows = []
    for dec in ("tucker2", "cp", "tt"):
        for label, params in VARIANTS[: 1 if dec == "cp" else 2]:
            ctx = LocalTrialContext(reference, splits, input_shape=shape, targets=targets, decomposers=dec,
                                    selector="fixed", selector_params={"fraction": 0.25}, device="cpu", seed=0,
                                    batch_size=64)
            start = time.process_time()
            out = rankopt.strategy("admm").run(ctx, {**params, "epochs": 2, "finetune_epochs": 0})
            history = ctx.reported["admm_residual_history"]
            rows.append([
                f"{dec} (LeNet-5/MNIST, 0.25 ranks)", label, f"{history[0]:.4f}",
                f"{out.extra['admm_final_residual']:.4f}", str(out.extra["admm_updates"]),
                str(out.extra["admm_update_interval"]), f"{out.extra['accuracy_before_compression']:.4f}",
                f"{out.extra['accuracy_after_compression']:.4f}", f"{time.process_time() - start:.0f}",
            ])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decomposers", default="tucker2,tt,cp")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for dec in args.decomposers.split(","):
        for label, params in VARIANTS:
            if dec == "cp" and params.get("schedule") == "epoch":
                continue  # CP's ALS projections are slow; the default and paper rows suffice
            ctx = make_context(decomposers=dec)
            start = time.process_time()
            out = rankopt.strategy("admm").run(ctx, {**params, "finetune_epochs": 0})
            history = ctx.reported["admm_residual_history"]
            rows.append([
                dec, label, f"{history[0]:.4f}", f"{out.extra['admm_final_residual']:.4f}",
                str(out.extra["admm_updates"]), str(out.extra["admm_update_interval"]),
                f"{out.extra['accuracy_before_compression']:.4f}", f"{out.extra['accuracy_after_compression']:.4f}",
                f"{time.process_time() - start:.0f}",
            ])
            print(" | ".join(rows[-1]), flush=True)
    data = HERE.parent / ".." / "shared" / "data"
    if (data / "mnist_train.npz").is_file():
        rows += mnist_rows(data)
    load = "%.2f, %.2f, %.2f" % os.getloadavg()
    table = (
        "small_cnn on digits, energy p=0.95 ranks, ADMM 2 epochs (stops at residual 0.01), no fine-tuning; "
        f"then LeNet-5 on {MNIST_TRAIN:,} MNIST images at 0.25 of the largest ranks, ADMM with the defaults "
        "(2 epochs, stops at residual 0.01). CP's projections are warm-started from the previous Z's "
        "factors; rho grows x1.5 after an update that leaves the residual above half the previous one "
        "(not on the digits rows: their 2 updates do not stall). 1 CPU thread. "
        f"Load average at the end: {load} (machine shared by six engineers "
        "and the lead's benchmarks).\n\n"
        + markdown_table(
            ["decomposer", "schedule", "residual at start", "residual at end", "Z/U updates", "interval (steps)",
             "acc. before compression", "acc. after compression", "CPU s"],
            rows,
        )
    )
    print(table)
    if args.record:
        record("ADMM residuals at the end of training (bench_admm_residuals)", table, invocation())


if __name__ == "__main__":
    main()
