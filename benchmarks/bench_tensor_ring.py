"""Tensor Ring (contrib plugin) against the built-in Tucker-2 and TT.

Run: ``.venv/bin/python benchmarks/bench_tensor_ring.py`` (about 2 minutes on 2 CPUs;
needs ``pip install -e plugins/rankopt-tensor-ring``, which ``make install`` does).

1. The quickstart's small CNN (width 32) trained for 4 epochs on scikit-learn's 8x8
   digits; its two wide 3x3 convs (32->64 and 64->64) compressed by each decomposer
   with the ``fixed`` selector at a share of every largest rank. Reported: model
   parameters and FLOPs after compression, the mean relative weight error of the two
   convs (``||W - W_r|| / ||W||``), validation accuracy right after compression and
   after one epoch of fine-tuning (SGD, lr 0.02).

What the contract kit costs per plugin is measured by ``bench_contract_kit.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import record  # noqa: E402

import rankopt  # noqa: E402
from rankopt.compression.selection import select_spec  # noqa: E402
from rankopt.compression.surgery import find_layers  # noqa: E402
from rankopt.training.loop import evaluate, make_loader, train  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/bench_tensor_ring.py"
DECOMPOSERS = ("tucker2", "tt", "tensor_ring")
FRACTIONS = (0.25, 0.5)
TARGETS = ("3", "7")


def compression_table() -> str:
    torch.manual_seed(0)
    splits = rankopt.dataset("digits")
    train_loader = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)
    val_loader = make_loader(splits.val, batch_size=256)
    reference = rankopt.model("small_cnn", width=32, num_classes=splits.num_classes)
    train(reference, train_loader, epochs=4, lr=0.05, device="cpu", amp=False, seed=0)
    shape = (1, *splits.input_shape)
    base = rankopt.count(reference, shape)
    base_acc = evaluate(reference, val_loader, device="cpu")
    targets = [la for la in find_layers(reference, shape) if la.name in TARGETS]
    rows = [f"| reference | - | {base.params} | {base.flops} | - | {base_acc:.3f} | - |"]
    for name in DECOMPOSERS:
        for fraction in FRACTIONS:
            spec, _ = select_spec(reference, targets, {t.name: name for t in targets}, "fixed", {"fraction": fraction})
            model = rankopt.compress(reference, spec)
            cost = rankopt.count(model, shape)
            errors = []
            for layer, entry in spec.items():
                dec = rankopt.decomposer(entry["decomposer"])
                w = reference.get_submodule(layer).weight.detach()
                errors.append(float((dec.project(w, entry["ranks"], entry.get("options")) - w).norm() / w.norm()))
            acc0 = evaluate(model, val_loader, device="cpu")
            train(model, train_loader, epochs=1, lr=0.02, device="cpu", amp=False, seed=0)
            acc1 = evaluate(model, val_loader, device="cpu")
            ranks = "; ".join(f"{k}: {v['ranks']}" for k, v in spec.items())
            err = sum(errors) / len(errors) if errors else float("nan")
            rows.append(
                f"| {name} @ {fraction} | {ranks} | {cost.params} | {cost.flops} | {err:.3f} | {acc0:.3f} | {acc1:.3f} |"
            )
            print(rows[-1], flush=True)
    header = (
        "| decomposer @ share of largest ranks | ranks (conv 3; conv 7) | params | FLOPs | "
        "mean rel. weight error | val. accuracy, no fine-tuning | after 1 epoch |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |\n"
    )
    return header + "\n".join(rows)


def main() -> None:
    torch.set_num_threads(1)
    if "tensor_ring" not in rankopt.plugin_names()["decomposers"]:
        sys.exit("tensor_ring is not installed: pip install -e plugins/rankopt-tensor-ring")
    first = compression_table()
    print(first)
    record("Tensor Ring vs Tucker-2 and TT on the quickstart CNN (digits)", first, COMMAND)


if __name__ == "__main__":
    main()
