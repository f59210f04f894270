"""The five training strategies side by side on MNIST with LeNet-5, at about equal params.

One trained reference (LeNet-5, Caffe variant: conv 1->20 5x5, conv 20->50 5x5, FC 500),
then one trial per strategy through :class:`rankopt.training.trial.LocalTrialContext`, Tucker-2
on the conv layers (and DeepTwist once more with CP, whose compression must stay lossless). ``finetune``, ``nrmf``, ``deeptwist`` and ``admm`` compress at the
same ranks (the ``fixed`` selector, by default 0.1 of each mode's largest rank, picked
on the weights each strategy hands it: equal params by construction); ``tdlrt``
learns its ranks, with ``tau`` set where its truncation, applied to the reference's
spectra, settles at about the same conv params; training then moves the ranks. Every
strategy gets a budget of 2 training epochs in all.

Columns: accuracy of the full model when compression happens (the reference for
finetune; after the regularized / distorted training for the others; TDLRT trains
in Tucker form, so it has none), right after decomposition, and at the end
(after fine-tuning where the strategy has it); wall time of the whole trial.

Scaled for a CPU: 10,000 training images, validation on the first 2,000 MNIST test
images, batch 64, SGD Nesterov with cosine schedule, seed 0, one CPU thread.

Run: ``.venv/bin/python benchmarks/bench_strategies_mnist.py`` (``--quick`` for a smoke
run that records nothing). Skips with a message when ``../shared/data`` lacks MNIST.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rankopt  # noqa: E402
from _record import markdown_table  # noqa: E402
from rankopt.training.loop import make_loader, seed_everything, train  # noqa: E402
from rankopt.training.trial import LocalTrialContext  # noqa: E402

INPUT_SHAPE = (1, 1, 28, 28)


def strategy_settings(epochs: float, tau: float) -> list[tuple[str, dict[str, Any], str]]:
    """(strategy, hyperparameters, decomposer) per row; ADMM at its default (fixed) interval."""
    half = epochs / 2
    admm_interval = rankopt.strategy("admm").defaults()["update_interval"]
    return [
        ("finetune", {"epochs": epochs, "lr": 0.01}, "tucker2"),
        ("nrmf", {"alpha": 1e-2, "epochs": half, "finetune_epochs": half, "lr": 0.01}, "tucker2"),
        ("deeptwist", {"distortion_steps": 50, "epochs": epochs, "lr": 0.01}, "tucker2"),
        # CP-ALS is no projection: the compressed model must still equal the trained one
        ("deeptwist", {"distortion_steps": 50, "epochs": epochs, "lr": 0.01}, "cp"),
        ("admm", {"rho": 1.0, "update_interval": admm_interval, "epochs": half, "tol": 0.01,
                  "finetune_epochs": half, "lr": 0.01}, "tucker2"),
        ("tdlrt", {"tau": round(tau, 4), "epochs": epochs, "lr": 0.01}, "tucker2"),
    ]


def preset_settings(epochs: float, tau: float) -> list[tuple[str, dict[str, Any], str]]:
    """The paper strategies twice, at the same budget: ``preset: paper`` and the default.

    The paper presets' own training lengths (NRMF: 50 epochs) do not fit a CPU run: every
    row gets ``epochs`` in all, split half/half where the strategy fine-tunes; DeepTwist's
    S_D is the paper's CIFAR-10 value, 200 (scaled to at most half the run's steps).
    """
    half = epochs / 2
    rows: list[tuple[str, dict[str, Any], str]] = []
    for preset in ("paper", "default"):
        rows += [
            ("nrmf", {"preset": preset, "epochs": half, "finetune_epochs": half}, "tucker2"),
            ("admm", {"preset": preset, "epochs": half, "finetune_epochs": half}, "tucker2"),
            ("deeptwist", {"preset": preset, "distortion_steps": 200, "epochs": epochs}, "tucker2"),
            ("tdlrt", {"preset": preset, "tau": round(tau, 4), "epochs": epochs}, "tucker2"),
        ]
    return rows


def calibrated_tau(reference: torch.nn.Module, spec: dict, input_hw: dict) -> float:
    """The tau at which TDLRT's ranks on the reference weights give the conv params nearest the spec's.

    The truncation runs after every step, each time relative to the current core norm,
    so a mode settles where every kept singular value exceeds ``tau * ||W||`` (a value
    below that is the whole tail on its own, and goes). The candidates are the
    normalized singular values of every mode (where a rank changes).
    """
    tucker2 = rankopt.decomposer("tucker2")

    def conv_params(ranks_of: dict) -> int:
        total = 0
        for name, ranks in ranks_of.items():
            conv = reference.get_submodule(name)
            dense = sum(p.numel() for p in conv.parameters())
            total += min(dense, tucker2.cost(conv, ranks, input_hw[name]).params)
        return total

    normalized = {
        name: [s / s.norm() for s in (torch.linalg.svdvals(m.double()) for m in
               tucker2.rank_matrices(reference.get_submodule(name).weight.detach()))]
        for name in spec
    }
    target = conv_params({n: tuple(e["ranks"]) for n, e in spec.items()})
    candidates = sorted({float(v) for ss in normalized.values() for s in ss for v in s})

    def settled(tau: float) -> dict:
        return {n: tuple(max(1, int((s > tau).sum())) for s in ss) for n, ss in normalized.items()}

    return min(candidates, key=lambda tau: abs(conv_params(settled(tau)) - target))


def row(name: str, params: dict, outcome: rankopt.TrialOutcome, ctx: LocalTrialContext,
        reference_accuracy: float, seconds: float, targets: list[str]) -> list[str]:
    extra = outcome.extra
    if name == "finetune":
        before, after = reference_accuracy, extra.get("accuracy_before_finetune")
    elif name == "tdlrt":
        before, after = None, extra["accuracy_after_compression"]
    else:
        before = extra.get("accuracy_before_last_distortion", extra.get("accuracy_before_compression"))
        after = extra["accuracy_after_compression"]
    final = ctx.evaluate(outcome.model)
    cost = rankopt.count(outcome.model, input_shape=INPUT_SHAPE)
    conv_params = sum(
        sum(p.numel() for p in outcome.model.get_submodule(t).parameters()) for t in targets
    )
    ranks = ", ".join(f"{n} {tuple(e['ranks'])}" for n, e in outcome.spec.items()) or "(none)"
    setting = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())

    def fmt(a: float | None) -> str:
        return "-" if a is None else f"{a:.4f}"

    return [name, setting, ranks, f"{conv_params:,}", f"{cost.params:,}", f"{cost.flops / 1e6:.2f}",
            fmt(before), fmt(after), fmt(final), f"{seconds:.0f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--epochs", type=float, default=2.0, help="training budget per strategy")
    parser.add_argument("--fraction", type=float, default=0.1,
                        help="fixed ranks: this fraction of each mode's largest rank")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; records nothing")
    parser.add_argument("--presets", action="store_true",
                        help="paper preset against default for nrmf, admm, deeptwist, tdlrt (own section)")
    parser.add_argument("--record", action="store_true", help="with --quick: record anyway")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_images, args.epochs = 2000, 1.0
    from _record import mnist_splits

    splits = mnist_splits(args.train_images)
    if splits is None:
        return 0
    seed_everything(0)
    reference = rankopt.model("lenet5")
    start = time.perf_counter()
    train(reference, make_loader(splits.train, batch_size=64, shuffle=True, seed=0),
          epochs=args.epochs, lr=0.05, device="cpu", seed=0)
    reference_seconds = time.perf_counter() - start
    reference.eval()
    targets = [t for t in rankopt.find_layers(reference, INPUT_SHAPE) if t.kind == "conv2d"]
    names = [t.name for t in targets]

    def context(decomposer: str = "tucker2") -> LocalTrialContext:
        return LocalTrialContext(
            reference, splits, input_shape=INPUT_SHAPE, targets=targets, decomposers=decomposer,
            selector="fixed", selector_params={"fraction": args.fraction}, device="cpu", seed=0,
            batch_size=64,
        )

    probe = context()
    reference_accuracy = probe.evaluate(reference)
    input_hw = {t.name: t.input_hw for t in targets}
    tau = calibrated_tau(reference, probe.select_ranks(reference), input_hw)
    base = rankopt.count(reference, input_shape=INPUT_SHAPE)
    base_conv = sum(sum(p.numel() for p in reference.get_submodule(n).parameters()) for n in names)
    rows = [["reference", f"{args.epochs:g} epochs, lr=0.05", "-", f"{base_conv:,}", f"{base.params:,}",
             f"{base.flops / 1e6:.2f}", "-", "-", f"{reference_accuracy:.4f}", f"{reference_seconds:.0f}"]]
    settings = preset_settings(args.epochs, tau) if args.presets else strategy_settings(args.epochs, tau)
    for name, params, decomposer in settings:
        ctx = context(decomposer)
        start = time.perf_counter()
        outcome = rankopt.strategy(name).run(ctx, params)
        seconds = time.perf_counter() - start
        rows.append(row(name, params, outcome, ctx, reference_accuracy, seconds, names))
        if decomposer != "tucker2":
            rows[-1][0] = f"{name} ({decomposer})"
        print(" | ".join(rows[-1]), flush=True)

    header = ["strategy", "setting", "ranks (r_in, r_out) or (R,)", "conv params", "model params", "MFLOPs",
              "acc. full model", "acc. after decomposition", "acc. final", "wall s"]
    lines = [
        f"LeNet-5 (Caffe variant) on MNIST: {args.train_images:,} training images, val = first 2,000 "
        f"test images; Tucker-2 on the convs (CP where the row says; ranks (R,)); fixed ranks = {args.fraction:g} of each mode's largest "
        f"(tdlrt: tau = {tau:.4f}, at which TDLRT's ranks on the reference would give about those conv params); "
        f"{args.epochs:g} training epochs per strategy; batch 64, SGD Nesterov, cosine, seed 0, 1 CPU thread.",
        "",
        markdown_table(header, rows),
    ]
    table = "\n".join(lines)
    print(table)
    if not args.quick or args.record:
        import os

        from _record import record

        command = ".venv/bin/python benchmarks/bench_strategies_mnist.py" + (
            " " + " ".join(argv) if argv else ""
        )
        if args.presets:
            load = "%.2f, %.2f, %.2f" % os.getloadavg()
            note = (
                "\n\npaper = `preset: paper` (the paper's loss and schedule, no distillation; NRMF alpha 1e-2 "
                "lr 1e-4, ADMM once per epoch rho 1e-3 lr 0.1, TDLRT random init and the paper's integrator); "
                "default = the strategy's defaults (distillation in the fine-tuning, ADMM per step at rho 1, "
                "TDLRT from the trained reference). Same budget per row. "
                f"Load average: {load} (machine shared by nine engineers).\n"
            )
            record("Training strategies on MNIST: paper preset against default", table + note, command)
        else:
            record("Training strategies on MNIST at about equal params", table, command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
