"""NRMF's "effect of the regularizer" experiment on MNIST (``seeds/000_*``), scaled to a CPU.

LeNet-5 with the extra 3x3 128->256 conv (``lenet5, extra_conv=True``) is trained from
the same seeded initialization with and without the nuclear-norm regularizer
(``alpha * sum of nuclear norms of the channel unfoldings`` of every conv, alpha = 1e-2
as in the paper). The singular values of the extra layer's two unfoldings (input
channels S = 128, output channels T = 256) are recorded during training and plotted
(``benchmarks/figures/nrmf_mnist_singular_values.png``); the table gives accuracy and
the Tucker-2 ranks the energy threshold p = 0.92 / 0.95 / 0.98 selects on that layer.

Scaled down from the paper (50 epochs of all 60k images, batch 64, lr 1e-4 decayed):
the first 8,000 training images, 2 epochs, SGD with Nesterov
momentum, lr 0.05, cosine schedule (the shared training loop's defaults), one CPU
thread. Validation: the first 2,000 MNIST test images.

Run: ``.venv/bin/python benchmarks/bench_nrmf_mnist.py`` (``--quick`` for a smoke run
that records nothing). Skips with a message when ``../shared/data`` lacks MNIST.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rankopt  # noqa: E402
from rankopt.plugins.selectors._spectra import energy_rank  # noqa: E402
from rankopt.plugins.strategies._common import channel_unfoldings  # noqa: E402
from rankopt.plugins.strategies.nrmf import nuclear_norm_penalty  # noqa: E402
from rankopt.training.loop import evaluate, make_loader, seed_everything, train  # noqa: E402

HERE = Path(__file__).resolve().parent
FIGURE = HERE / "figures" / "nrmf_mnist_singular_values.png"
LAYER = "conv3"  # the extra 3x3 128 -> 256 conv
CONVS = ["conv1", "conv2", "conv3"]
THRESHOLDS = (0.92, 0.95, 0.98)


def spectra(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Singular values of the layer's (S-mode, T-mode) unfoldings."""
    weight = model.get_submodule(LAYER).weight.detach().double()
    by_t, by_s = channel_unfoldings(weight)
    return torch.linalg.svdvals(by_s).numpy(), torch.linalg.svdvals(by_t).numpy()


def run(alpha: float, splits: rankopt.DatasetSplits, args: argparse.Namespace) -> dict:
    seed_everything(0)
    model = rankopt.model("lenet5", extra_conv=True)
    loader = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)
    steps_per_epoch = len(loader)
    history: list[tuple[float, np.ndarray, np.ndarray]] = [(0.0, *spectra(model))]

    def record(net: torch.nn.Module, step: int) -> None:
        if step % args.record_every == 0:
            history.append((step / steps_per_epoch, *spectra(net)))

    start = time.perf_counter()
    train(
        model, loader, epochs=args.epochs, lr=args.lr, device="cpu", seed=0,
        extra_loss=nuclear_norm_penalty(CONVS, alpha) if alpha > 0 else None,
        step_callback=record,
    )
    seconds = time.perf_counter() - start
    if history[-1][0] != args.epochs:
        history.append((float(args.epochs), *spectra(model)))
    accuracy = evaluate(model, make_loader(splits.val, batch_size=500))
    tucker2, energy = rankopt.decomposer("tucker2"), rankopt.rank_selector("energy")
    conv = model.get_submodule(LAYER)
    ranks = {p: tuple(energy.select(conv, tucker2, p=p)) for p in THRESHOLDS}
    params = {p: tucker2.cost(conv, r, (8, 8)).params for p, r in ranks.items()}
    return {"alpha": alpha, "history": history, "accuracy": accuracy, "ranks": ranks,
            "params": params, "seconds": seconds, "dense_params": sum(p.numel() for p in conv.parameters())}


def plot(results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 8), sharey="row")
    for col, res in enumerate(results):
        times = [h[0] for h in res["history"]]
        colors = plt.cm.viridis(np.linspace(0, 1, len(times)))
        for row, (mode, size) in enumerate((("input channels S", 128), ("output channels T", 256))):
            ax = axes[row][col]
            for (epoch, s_in, s_out), color in zip(res["history"], colors):
                values = s_in if row == 0 else s_out
                ax.semilogy(np.arange(1, values.size + 1), values, color=color, lw=1,
                            label=f"epoch {epoch:.2f}")
            ax.set_title(f"{LAYER} unfolding by {mode} ({size} SVs), alpha = {res['alpha']:g}")
            ax.set_xlabel("index")
            ax.set_ylabel("singular value")
            ax.grid(True, which="both", alpha=0.3)
            if len(times) <= 12:
                ax.legend(fontsize=7)
    fig.suptitle("NRMF on MNIST: singular values of LeNet-5's extra 3x3 128->256 conv during training")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    plt.close(fig)


def tables(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"LeNet-5 + extra 3x3 128->256 conv, MNIST: {args.train_images:,} training images, "
        f"{args.epochs:g} epochs, batch 64, SGD Nesterov lr {args.lr:g} cosine, seed 0, 1 CPU thread; "
        "val = first 2,000 MNIST test images. Regularizer on conv1-3. "
        f"Figure: `benchmarks/figures/{FIGURE.name}`.",
        "",
        "Tucker-2 ranks (r_in = S/R3, r_out = T/R4) of conv3 chosen by the energy threshold p "
        f"(dense conv3: {results[0]['dense_params']:,} params):",
        "",
        "| alpha | val accuracy | train s | " + " | ".join(
            f"ranks p={p:g} | conv3 params p={p:g}" for p in THRESHOLDS) + " |",
        "|---|---|---|" + "---|---|" * len(THRESHOLDS),
    ]
    for res in results:
        cells = [f"{res['alpha']:g}", f"{res['accuracy']:.4f}", f"{res['seconds']:.0f}"]
        for p in THRESHOLDS:
            ratio = res["dense_params"] / res["params"][p]
            cells += [str(res["ranks"][p]), f"{res['params'][p]:,} (x{ratio:.2f})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Energy ranks (p = 0.95) of conv3's unfoldings (S-mode, T-mode) and its largest singular "
        "value over training:",
        "",
        "| epoch | " + " | ".join(f"alpha={r['alpha']:g}: ranks | sigma_1" for r in results) + " |",
        "|---|" + "---|---|" * len(results),
    ]
    for i, (epoch, *_rest) in enumerate(results[0]["history"]):
        cells = [f"{epoch:.2f}"]
        for res in results:
            _, s_in, s_out = res["history"][i]
            cells += [f"({energy_rank(s_in, 0.95)}, {energy_rank(s_out, 0.95)})", f"{s_out[0]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PAPER_TABLE = {  # seed 000, ResNet-18 on CIFAR-10, p = 95 %: accuracy (VBMF ranks, NRMF ranks)
    "normal": ("94.40 %", "94.40 %"), "regularized": ("93.58 %", "93.91 %"), "params": ("7.01M", "3.88M"),
}


def rank_init_table(splits: rankopt.DatasetSplits, args: argparse.Namespace) -> str:
    """Seed 000's rank x initialization table with equal training (the four rows of nrmf).

    One LeNet-5 (extra conv) reference trained ``--epochs``; every row then runs the nrmf
    strategy from that same reference with ``preset: paper`` (plain cross-entropy, alpha
    1e-2) and the same ``--table-epochs`` of training (with the regularizer for the
    "regularized" model, without it for the "normal" one, from the same start) and the
    same fine-tuning. VBMF ranks: the vbmf selector on the normal model; NRMF ranks: the
    energy selector (p = 0.95) on the regularized one.
    """
    from _record import markdown_table

    from rankopt.training.trial import LocalTrialContext

    seed_everything(0)
    reference = rankopt.model("lenet5", extra_conv=True)
    train(reference, make_loader(splits.train, batch_size=64, shuffle=True, seed=0),
          epochs=args.epochs, lr=args.lr, device="cpu", seed=0)
    reference.eval()
    shape = (1, 1, 28, 28)
    targets = [t for t in rankopt.find_layers(reference, shape) if t.kind == "conv2d"]
    columns = {"VBMF ranks": ("normal", "vbmf", {}), "NRMF ranks": ("regularized", "energy", {"p": 0.95})}
    cells: dict[tuple[str, str], str] = {}
    params: dict[str, str] = {}
    for column, (ranks_from, selector, sel_params) in columns.items():
        for init_from in ("normal", "regularized"):
            ctx = LocalTrialContext(
                reference, splits, input_shape=shape, targets=targets, decomposers="tucker2",
                selector=selector, selector_params=sel_params, device="cpu", seed=0, batch_size=64,
            )
            hp = {"preset": "paper", "epochs": args.table_epochs, "finetune_epochs": args.table_epochs,
                  "lr": args.lr, "ranks_from": ranks_from, "init_from": init_from}
            outcome = rankopt.strategy("nrmf").run(ctx, hp)
            cells[init_from, column] = f"{ctx.evaluate(outcome.model):.4f}"
            params[column] = f"{rankopt.count(outcome.model, input_shape=shape).params:,}"
            print(init_from, column, cells[init_from, column], params[column], flush=True)
    rows = [
        [f"{'VBMF (normal)' if i == 'normal' else 'NRMF (regularized)'} initialization",
         cells[i, "VBMF ranks"], cells[i, "NRMF ranks"], PAPER_TABLE[i][0], PAPER_TABLE[i][1]]
        for i in ("normal", "regularized")
    ]
    rows.append(["#parameters", params["VBMF ranks"], params["NRMF ranks"], *PAPER_TABLE["params"]])
    import os

    return (
        f"LeNet-5 (extra 3x3 conv) on MNIST, {args.train_images:,} training images, val = first 2,000 test "
        f"images; reference {args.epochs:g} epochs at lr {args.lr:g}; every row: nrmf preset paper (alpha 1e-2, "
        f"no distillation) with lr {args.lr:g} (the paper's 1e-4 is for 50 epochs), {args.table_epochs:g} "
        f"regularized (or plain) epochs from the same reference and {args.table_epochs:g} fine-tuning epochs. "
        f"Beside it the paper's table (ResNet-18 on CIFAR-10, p = 95 %). Load average: "
        + "%.2f, %.2f, %.2f" % os.getloadavg() + " (machine shared by nine engineers).\n\n"
        + markdown_table(["", "VBMF ranks", "NRMF ranks", "paper: VBMF ranks", "paper: NRMF ranks"], rows)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=1e-2)
    parser.add_argument("--record-every", type=int, default=40, help="steps between two spectra")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; records nothing")
    parser.add_argument("--table", action="store_true",
                        help="the rank x initialization table with equal training instead of the spectra")
    parser.add_argument("--table-epochs", type=float, default=1.0, help="--table: regularized and fine-tuning epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_images, args.epochs, args.record_every = 1000, 0.5, 4
    from _record import mnist_splits

    splits = mnist_splits(args.train_images)
    if splits is None:
        return 0
    torch.set_num_threads(1)  # the machine is shared; one thread is faster and steadier here
    if args.table:
        table = rank_init_table(splits, args)
        print(table)
        if not args.quick:
            from _record import invocation, record

            record("NRMF rank x init table with equal training (bench_nrmf_mnist --table)", table, invocation())
        return 0
    results = [run(alpha, splits, args) for alpha in (0.0, args.alpha)]
    plot(results)
    table = tables(results, args)
    from _record import report

    report("NRMF on MNIST: singular values with and without the regularizer", table, not args.quick,
           " ".join([".venv/bin/python benchmarks/bench_nrmf_mnist.py", *argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
