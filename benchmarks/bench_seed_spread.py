"""How far the training seed moves a model near the 1-point line of bench_front_quality.

The issue-18 aims ask for a model within 1 point of the reference; on the CPU-sized runs
the deciding models sit at that line. This fine-tunes each of them from the same
decomposition of the same reference with several training seeds (data order, the only
randomness), with the settings' fine-tuning (epochs, lr, the default distillation), and
reports the spread against the line:

- MNIST/LeNet-5: the VBMF sweep's 1.5x point as the study seeds it
  (:func:`rankopt.search.seeding.anchored_proposals`: the classifier cut too, what that
  frees given to the other layers), and the same point as it was before that rebalancing
  (the classifier kept full: conv2 Tucker-2 4x10, fcs.0 SVD 7, 16,760 params);
- CIFAR-10/ResNet-20: the ``budget`` selector's default proposal (half the params,
  136,208 on the recorded reference).

    .venv/bin/python benchmarks/bench_front_quality.py --quick --setting mnist   # the references
    .venv/bin/python benchmarks/bench_seed_spread.py --quick --out runs/bench_front_quality --record
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rankopt  # noqa: E402
from _baselines import markdown_table, settings  # noqa: E402

DEFAULT_OUT = Path("runs") / "bench_front_quality"
# the VBMF sweep's 1.5x point before the classifier was rebalanced (the study seeded it so until 2026-12)
KEPT_CLASSIFIER = {"conv2": {"decomposer": "tucker2", "ranks": [4, 10]},
                   "fcs.0": {"decomposer": "svd", "ranks": [7]}}


def _reference(setting: Any, out: Path) -> torch.nn.Module:
    weights = out / setting.key / "reference.pt"
    if not weights.is_file():
        raise SystemExit(f"no {weights}: run bench_front_quality.py --setting {setting.key} with the same --out first")
    in_ch = 1 if setting.key == "mnist" else 3
    model = rankopt.model(setting.model["name"], num_classes=10, in_channels=in_ch)
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def _budget_spec(reference: torch.nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
    """The budget selector's default proposal, as a study resolves it (Tucker-2 on convs,
    SVD on linears, stems dense, targets.min_saving's default)."""
    from rankopt.config.sections import TargetsConfig
    from rankopt.compression.selection import select_spec

    layers = rankopt.find_layers(reference, shape)
    decomposers = {la.name: "tucker2" if la.kind == "conv2d" else "svd" for la in layers}
    params = dict(rankopt.rank_selector("budget").defaults())
    spec, _ = select_spec(reference, layers, decomposers, "budget", params, input_shape=shape,
                          min_in_channels=4, min_saving=TargetsConfig().min_saving)
    return spec


def _sweep_spec(setting: Any, reference: torch.nn.Module, out: Path, shape: tuple[int, ...]) -> dict[str, Any]:
    """The VBMF sweep's first (1.5x) point as the ``rankopt`` study of ``setting`` seeds
    it, resolved to ranks."""
    from _baselines import method_config

    from rankopt.config.schema import load_config
    from rankopt.search.seeding import anchored_proposals
    from rankopt.search.space import SearchSpace
    from rankopt.compression.selection import select_spec

    config = load_config(method_config(setting, "rankopt", out / setting.key / "reference.pt", out, "cpu"))
    targets = rankopt.find_layers(reference, shape)
    space = SearchSpace(config, reference, targets)
    options = {"min_in_channels": config.targets.dense_input_channels + 1, "min_saving": config.targets.min_saving}
    point = anchored_proposals(space, reference, targets, **options)[0]
    plan = space.plan(space.check_point(point, "proposal"))
    spec, _ = select_spec(reference, targets, plan.decomposers, "fixed", plan.selector_params, **options)
    return spec


def spread(setting: Any, out: Path, seeds: list[int]) -> list[list[str]]:
    from rankopt.training.distill import DISTILL_DEFAULTS
    from rankopt.training.trial import LocalTrialContext

    torch.set_num_threads(1)
    reference = _reference(setting, out)
    splits = rankopt.dataset("npz", **setting.data)
    shape = (1, 1, 28, 28) if setting.key == "mnist" else (1, 3, 32, 32)
    base = rankopt.count(reference, shape).params
    cases = ({"VBMF sweep 1.5x point": _sweep_spec(setting, reference, out, shape),
              "the same before the rebalancing (classifier kept)": KEPT_CLASSIFIER}
             if setting.key == "mnist" else {"budget selector's default proposal": _budget_spec(reference, shape)})
    ctx0 = LocalTrialContext(reference, splits, input_shape=shape, device="cpu", batch_size=setting.batch_size)
    ref_acc = ctx0.evaluate(reference)
    line = ref_acc - 0.01
    rows = []
    for label, spec in cases.items():
        accs = []
        for seed in seeds:
            decs = {name: e["decomposer"] for name, e in spec.items()}
            ctx = LocalTrialContext(reference, splits, input_shape=shape, decomposers=decs, device="cpu",
                                    seed=seed, batch_size=setting.batch_size)
            model = ctx.compress(ctx.model(), spec)
            ctx.compressed_layers = list(spec)
            ctx.train(model, epochs=setting.finetune_epochs, lr=setting.finetune_lr, **DISTILL_DEFAULTS)
            accs.append(ctx.evaluate(model))
            print(setting.key, label, seed, accs[-1], flush=True)
        params = rankopt.count(model, shape).params
        ranks = ", ".join(f"{n} {e['decomposer']} {'x'.join(map(str, e['ranks']))}" for n, e in spec.items())
        rows.append([setting.title, label, ranks if len(ranks) < 120 else f"{len(spec)} layers", f"{params:,}",
                     f"{base / params:.2f}x", " ".join(f"{a:.4f}" for a in accs),
                     f"{statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f}", f"{line:.4f}",
                     f"{sum(a >= line - 1e-9 for a in accs)} of {len(accs)}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the CPU-sized settings (as bench_front_quality --quick)")
    parser.add_argument("--setting", choices=["mnist", "cifar", "all"], default="all")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bench_front_quality's --out (its references)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="training seeds")
    parser.add_argument("--record", action="store_true", help="write the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least two seeds for a spread")
    chosen = ["mnist", "cifar"] if args.setting == "all" else [args.setting]
    rows: list[list[str]] = []
    for key in chosen:
        setting = settings(args.quick)[key]
        rows += spread(setting, args.out, args.seeds)
    text = (
        "Each model decomposed once from the recorded reference and fine-tuned with each "
        f"training seed ({', '.join(map(str, args.seeds))}: data order) at the setting's epochs and lr with the "
        "default distillation (lambda 0.5, T 4); validation accuracy against the line 1 point "
        "below the reference.\n\n"
        + markdown_table(["setting", "model", "ranks", "params", "compression", "accuracy per seed",
                          "mean ± sd", "line", "seeds at or above the line"], rows)
    )
    from _record import report

    report("Training-seed spread of the models at the 1-point line (issue 18)", text, args.record)


if __name__ == "__main__":
    main()
