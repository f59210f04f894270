"""Data-aware (independent and sequential) vs weight-space truncation, before any fine-tuning
(issue 29, item 2).

    .venv/bin/python benchmarks/bench_data_aware.py --record

Every target but the first conv and the classifier (the setting the issue measured) is
truncated at one common rank fraction, chosen per rate so that those layers hold 2x, 4x
and 8x fewer params; the same ranks go to the plain (weight-space) and the data-aware
decomposition (`rankopt.calibrate`: 512 training images' input statistics; independent,
and sequential: fitted in forward order), so each row has equal params. Accuracy on the
setting's full validation split, no training.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rankopt  # noqa: E402
from _baselines import markdown_table, missing_data, reference_weights, settings  # noqa: E402
from _record import invocation, record  # noqa: E402
from rankopt.compression.calibration import calibrate, detach_statistics  # noqa: E402
from rankopt.compression.calibration_images import attach_images, calibration_images  # noqa: E402
from rankopt.training.loop import evaluate, make_loader  # noqa: E402

RATES = (2, 4, 8)
CALIBRATION_IMAGES = 512


def uniform_spec(model, layers, dec_for, rate):  # type: ignore[no-untyped-def]
    """One rank fraction for every layer, the largest whose params are <= 1/rate of dense."""
    dense = sum(la.cost.params for la in layers)

    def spec_at(f: float):  # type: ignore[no-untyped-def]
        spec, params = {}, 0
        for la in layers:
            dec = rankopt.decomposer(dec_for(la))
            module = model.get_submodule(la.name)
            ranks = tuple(max(1, int(f * r)) for r in dec.max_ranks(module))
            spec[la.name] = {"decomposer": dec.name, "ranks": list(ranks)}
            params += dec.cost(module, ranks, la.input_hw).params
        return spec, params

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spec_at(mid)[1] <= dense / rate else (lo, mid)
    return spec_at(lo)


def run_setting(setting, out: Path, device: str) -> list[list[str]]:  # type: ignore[no-untyped-def]
    weights = reference_weights(setting, out, device)
    data = dict(setting.data)
    data.pop("limit", None)  # the whole validation split: the figures need its precision
    data["augment"] = False
    splits = rankopt.dataset("npz", **data)
    model = rankopt.model(setting.model["name"], num_classes=splits.num_classes,
                          in_channels=splits.input_shape[0])
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    model.eval()
    layers = rankopt.find_layers(model, (1, *splits.input_shape))[1:-1]
    val = make_loader(splits.val, batch_size=500)
    base_acc = evaluate(model, val)
    start = time.process_time()
    aware_model = copy.deepcopy(model)
    calibrate(aware_model, make_loader(splits.train, batch_size=128, shuffle=True, seed=0),
              [la.name for la in layers], images=CALIBRATION_IMAGES)
    calib_cpu = time.process_time() - start
    # the same images (same seeded order) for the sequential fit
    images = calibration_images(make_loader(splits.train, batch_size=128, shuffle=True, seed=0),
                                CALIBRATION_IMAGES)
    seq_cpu: list[float] = []
    rows = []
    for decs in ("svd", "tucker2"):
        def dec_for(la, decs=decs):  # type: ignore[no-untyped-def]
            return "svd" if la.kind == "linear" else decs
        for rate in RATES:
            spec, params = uniform_spec(model, layers, dec_for, rate)
            plain = rankopt.compress(model, spec)
            aware = rankopt.compress(aware_model, spec)
            detach_statistics(aware)
            carrying = copy.copy(aware_model)  # shares the weights and statistics
            attach_images(carrying, images)  # = rankopt.calibrate(..., mode="sequential")
            start = time.process_time()
            sequential = rankopt.compress(carrying, spec)
            seq_cpu.append(time.process_time() - start)
            detach_statistics(sequential)
            if decs == "svd" and rate == RATES[0]:
                step_cpu = train_cpu_per_image(sequential, splits, setting.batch_size)
            accs = (evaluate(plain, val), evaluate(aware, val), evaluate(sequential, val))
            rows.append([setting.key, decs + ("" if decs == "svd" else " (+svd Linear)"), f"{rate}x",
                         f"{params:,}", f"{accs[0]:.4f}", f"{accs[1]:.4f}", f"{accs[2]:.4f}",
                         f"{accs[1] - accs[0]:+.4f}", f"{accs[2] - accs[0]:+.4f}"])
            print(" | ".join(rows[-1]), flush=True)
    fit = sorted(seq_cpu)[len(seq_cpu) // 2]
    train_images = int(setting.data.get("limit", {}).get("train", len(splits.train)))
    finetune = step_cpu * train_images * setting.finetune_epochs
    rows.append([setting.key, "reference", "1x", f"{sum(la.cost.params for la in layers):,}",
                 f"{base_acc:.4f}", "", "", f"calibration {calib_cpu:.1f} s CPU",
                 f"sequential fit {fit:.1f} s CPU (median); a trial's fine-tuning "
                 f"({setting.finetune_epochs:g} epoch(s) x {train_images:,} images) ~{finetune:.0f} s CPU: "
                 f"{fit / finetune:.1%}"])
    return rows


def train_cpu_per_image(model, splits, batch_size: int, steps: int = 4) -> float:  # type: ignore[no-untyped-def]
    """Process CPU seconds per training image of ``model`` (SGD steps, one warm-up)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loader = make_loader(splits.train, batch_size=batch_size, shuffle=True, seed=1)
    spent, seen = 0.0, 0
    for i, (x, y) in enumerate(loader):
        start = time.process_time()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i > 0:
            spent += time.process_time() - start
            seen += x.shape[0]
        if i >= steps:
            break
    return spent / max(seen, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=["mnist", "cifar", "all"], default="all")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    chosen = ["mnist", "cifar"] if args.setting == "all" else [args.setting]
    rows = []
    for key in chosen:
        setting = settings(quick=True)[key]
        missing = missing_data(setting)
        if missing:
            print(f"skipped {key}: {', '.join(missing)} not in ../shared/data")
            continue
        rows += run_setting(setting, args.out, args.device)
    table = markdown_table(
        ["setting", "decomposer", "fewer params (truncated layers)", "params of those layers",
         "plain accuracy", "data-aware (independent)", "data-aware (sequential)",
         "independent - plain", "sequential - plain"], rows)
    print(table)
    if args.record:
        import os

        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        note = (
            "\n\nBefore any fine-tuning. Every target but the first conv and the classifier "
            "at one common rank fraction (the same ranks, so equal params, in every column); "
            f"independent = `rankopt.calibrate` on {CALIBRATION_IMAGES} training images "
            "(whitened SVD of `W L` for svd, the input-channel mode whitened for tucker2); "
            "sequential = `rankopt.calibrate(..., mode=\"sequential\")` on the same images "
            "(layers fitted in forward order to the inputs the compressed layers before them "
            "give, reduced-rank regression, ridge 0.1; the study default). The last row: the "
            "sequential fit's CPU time per model against the SGD steps of a trial's fine-tuning "
            "(compute only, measured on the 2x svd model; data loading and evaluation not counted). "
            "Accuracy on the whole validation split (MNIST test set, 10,000; CIFAR-10 batch 5, "
            "10,000). References: LeNet-5 trained by `_baselines.reference_weights` (quick), "
            "ResNet-20 the committed `benchmarks/references/resnet20_cifar10.pt`. "
            f"Load average at the end: {load} (accuracies are deterministic; times are not)."
        )
        record("Data-aware decomposition before fine-tuning", table + note, invocation())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
