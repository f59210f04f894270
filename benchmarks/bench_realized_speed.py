"""Realized speed of the models that bench_front_quality picked: measured latency against the
reference, the ratio of measured speed-up to FLOP reduction, and every decomposed layer that
runs slower than the layer it replaced.

    .venv/bin/python benchmarks/bench_front_quality.py --quick            # first: the picked models
    .venv/bin/python benchmarks/bench_realized_speed.py --quick --record

Latency: median of ``torch.utils.benchmark.Timer.blocked_autorange`` (warm-up and CUDA
synchronization included) of one forward pass in eval mode, one intra-op thread on CPU
(the setting of a trial on a shared machine), at batch 1 and batch 32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rankopt  # noqa: E402
from _baselines import markdown_table, picked_models, settings  # noqa: E402
from rankopt.deploy.artifacts import load_compressed  # noqa: E402
from rankopt.compression.surgery import LayerInfo  # noqa: E402

DEFAULT_OUT = Path("runs") / "bench_front_quality"
BATCHES = (1, 32)


def latency_ms(module: nn.Module, shape: tuple[int, ...], device: torch.device, threads: int) -> float:
    """Median forward time of ``module`` on zeros of ``shape``, in milliseconds."""
    from torch.utils.benchmark import Timer

    module = module.to(device).eval()
    x = torch.zeros(shape, device=device)
    with torch.no_grad():
        timer = Timer(stmt="m(x)", globals={"m": module, "x": x}, num_threads=threads)
        return float(timer.blocked_autorange(min_run_time=0.3).median * 1000.0)


def layer_input(info: LayerInfo, batch: int) -> tuple[int, ...]:
    if info.kind == "linear":
        return (batch, info.in_channels)
    assert info.input_hw is not None
    return (batch, info.in_channels, *info.input_hw)


def reference_model(picked: dict[str, Any], setting: Any) -> nn.Module:
    in_ch = 1 if setting.key == "mnist" else 3
    model = rankopt.model(setting.model["name"], num_classes=10, in_channels=in_ch)
    model.load_state_dict(torch.load(picked["reference_weights"], weights_only=True))
    return model.eval()


def measure_setting(setting: Any, out: Path, device: torch.device, threads: int) -> str:
    picked = picked_models(out, setting.key)
    reference = reference_model(picked, setting)
    side = 28 if setting.key == "mnist" else 32
    in_ch = 1 if setting.key == "mnist" else 3
    layers = {info.name: info for info in rankopt.find_layers(reference, (1, in_ch, side, side))}
    ref_flops = int(picked["baseline"]["flops"])
    for b in BATCHES:  # warm-up: the first timings of a process run slow (allocator, caches)
        latency_ms(reference, (b, in_ch, side, side), device, threads)
    ref_ms = {b: latency_ms(reference, (b, in_ch, side, side), device, threads) for b in BATCHES}
    rows = [["reference", "-", f"{picked['baseline']['accuracy']:.4f}", f"{ref_flops:,}",
             *(f"{ref_ms[b]:.3f}" for b in BATCHES), "1.00", "1.00", "1.00", "-"]]
    slow_rows: list[list[str]] = []
    seen: set[int] = set()
    for method, picks in picked["methods"].items():
        for label, pick in picks.items():
            if (method, pick["trial"]) in seen:  # type: ignore[comparison-overlap]
                continue
            seen.add((method, pick["trial"]))  # type: ignore[arg-type]
            model = load_compressed(pick["model_path"]).eval()
            ms = {b: latency_ms(model, (b, in_ch, side, side), device, threads) for b in BATCHES}
            flop_x = ref_flops / pick["flops"]
            speed = {b: ref_ms[b] / ms[b] for b in BATCHES}
            slower = []
            for name, entry in pick["spec"].items():
                info = layers[name]
                for b in BATCHES:
                    shape = layer_input(info, b)
                    before = latency_ms(reference.get_submodule(name), shape, device, threads)
                    after = latency_ms(model.get_submodule(name), shape, device, threads)
                    if after > before:
                        slower.append(f"{name}@{b}")
                        slow_rows.append([setting.key, f"{method} (trial {pick['trial']})", name,
                                          f"{entry['decomposer']} {entry['ranks']}", str(b),
                                          f"{before:.4f}", f"{after:.4f}", f"{after / before:.2f}"])
            rows.append([method, f"{label} pick, trial {pick['trial']}", f"{pick['accuracy']:.4f}",
                         f"{pick['flops']:,}", *(f"{ms[b]:.3f}" for b in BATCHES), f"{flop_x:.2f}",
                         *(f"{speed[b] / flop_x:.2f}" for b in BATCHES),
                         ", ".join(slower) or "none"])
            print(rows[-1], flush=True)
    # the reference once more, last: how far timings drift over the run (the noise floor)
    again = {b: latency_ms(reference, (b, in_ch, side, side), device, threads) for b in BATCHES}
    rows.append(["reference, timed again last", "-", f"{picked['baseline']['accuracy']:.4f}",
                 f"{ref_flops:,}", *(f"{again[b]:.3f}" for b in BATCHES), "1.00",
                 *(f"{ref_ms[b] / again[b]:.2f}" for b in BATCHES), "-"])
    table = markdown_table(
        ["method", "model", "val acc", "FLOPs", "ms @1", "ms @32", "FLOP reduction",
         "speed-up / FLOP reduction @1", "speed-up / FLOP reduction @32",
         "decomposed layers slower than the original (layer@batch)"],
        rows,
    )
    text = f"{setting.title} (device {device}, {threads} thread(s)):\n\n{table}"
    if slow_rows:
        text += "\n\nLayers slower than the layer they replaced:\n\n" + markdown_table(
            ["setting", "model", "layer", "decomposer, ranks", "batch", "original ms", "decomposed ms",
             "slow-down"], slow_rows)
    return text


# -- serving runtimes: eager vs ONNX Runtime (issue 14) --------------------------------------

RUNTIME_BATCHES = (1, 32)


def runtime_speeds(reference: nn.Module, model: nn.Module, shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    """Speed-ups of ``model`` over ``reference`` in eager and in ONNX Runtime (1 thread).

    All four callables (reference and model, eager and ORT) are timed in one interleaved
    loop on process CPU time (``rankopt.compression.latency.time_interleaved``), so load changes on
    the shared machine hit them alike.
    """
    from rankopt.compression.latency import runtime_callable, time_interleaved

    x = torch.zeros(shape)
    fns = [runtime_callable(m, x, rt, threads=1) for rt in ("eager", "onnxruntime") for m in (reference, model)]
    ref_e, mod_e, ref_o, mod_o = time_interleaved(fns, rounds=rounds)
    return {"ref_eager_ms": ref_e * 1e3, "eager": ref_e / mod_e, "ort": ref_o / mod_o,
            "ref_ort_ms": ref_o * 1e3, "model_ort_ms": mod_o * 1e3}


def fixed_fraction_model(reference: nn.Module, shape: tuple[int, ...], fraction: float, multiple: int) -> tuple[nn.Module, int]:
    """``reference`` with tucker2 at ``fraction`` of each conv's ranks (stems of <= 3 channels
    and 1x1 convs left dense, as a study does), ranks rounded to ``multiple``; and its FLOPs."""
    from rankopt.compression.selection import select_spec

    layers = rankopt.find_layers(reference, shape)
    convs = {la.name: "tucker2" for la in layers if la.kind == "conv2d" and tuple(la.kernel_size) != (1, 1)}
    spec, _ = select_spec(reference, layers, convs, "fixed", {"fraction": fraction},
                          rank_multiple=multiple, min_in_channels=4)
    model = rankopt.compress(reference, spec).eval()
    return model, rankopt.count(model, shape).flops


def _min_saving_default() -> float:
    from rankopt.config.sections import TargetsConfig

    return float(TargetsConfig().min_saving)


MIN_SAVING = _min_saving_default()  # targets.min_saving's default


def min_saving_spec(reference: nn.Module, spec: dict[str, Any], shape: tuple[int, ...],
                    min_saving: float = MIN_SAVING) -> tuple[dict[str, Any], list[str]]:
    """``spec`` without the layers whose factorized form saves less than ``min_saving`` of
    their params or FLOPs (a study's rule, applied by :func:`rankopt.compression.selection.select_spec`
    to the spec's own ranks), and those layers' names."""
    from rankopt.compression.selection import select_spec

    kept, _ = select_spec(reference, rankopt.find_layers(reference, shape),
                          {name: e["decomposer"] for name, e in spec.items()}, "fixed",
                          {"ranks": {name: list(e["ranks"]) for name, e in spec.items()}},
                          min_saving=min_saving)
    return kept, [name for name in spec if name not in kept]


def runtime_rows(args: argparse.Namespace) -> str:
    """Eager vs ONNX Runtime speed-ups: the front-quality picks where present, and
    structure-only tucker2 models (speed does not depend on the weights' values)."""
    from rankopt.compression.latency import keep_faster_layers

    rows: list[list[str]] = []
    cases: list[tuple[str, str, nn.Module, nn.Module, tuple[int, ...]]] = []
    for key in ("mnist", "cifar"):
        setting = settings(args.quick)[key]
        if (args.out / key / "picked.json").is_file():
            picked = picked_models(args.out, key)
            ref = reference_model(picked, setting)
            side, in_ch = (28, 1) if key == "mnist" else (32, 3)
            for method, picks in picked["methods"].items():
                for label, pick in picks.items():
                    model = load_compressed(pick["model_path"]).eval()
                    shape = (1, in_ch, side, side)
                    cases.append((setting.title, f"{method} {label} pick (trial {pick['trial']})", ref, model, shape))
                    kept, dense = min_saving_spec(ref, pick["spec"], shape)
                    if dense:  # what targets.min_saving (a study's default since) makes of it
                        cases.append((setting.title, f"{method} {label} pick (trial {pick['trial']}), structure "
                                      f"under min_saving {MIN_SAVING:g}: {len(dense)} layer(s) dense",
                                      ref, rankopt.compress(ref, kept).eval(), shape))
                    # what `rankopt export --keep-faster` ships: the layers slower in ORT dense again
                    _, slower = keep_faster_layers(ref, pick["spec"], rankopt.find_layers(ref, shape),
                                                   runtime="onnxruntime", repeats=args.rounds)
                    if slower:
                        cases.append((setting.title, f"{method} {label} pick (trial {pick['trial']}), exported "
                                      f"with --keep-faster: {len(slower)} of {len(pick['spec'])} layer(s) dense",
                                      ref, rankopt.densify(model, ref, slower), shape))
    zoo = [("LeNet-5 (MNIST 28x28)", "lenet5", (1, 1, 28, 28)),
           ("ResNet-20 (CIFAR)", "resnet20_cifar", (1, 3, 32, 32)),
           ("ResNet-18 (CIFAR)", "resnet18_cifar", (1, 3, 32, 32))]
    for title, name, shape in zoo:
        torch.manual_seed(0)
        ref = rankopt.model(name, num_classes=10, in_channels=shape[1]).eval()
        for fraction in (0.25, 0.5):
            for multiple in ((1, 8) if name != "resnet18_cifar" else (1,)):
                model, _ = fixed_fraction_model(ref, shape, fraction, multiple)
                cases.append((title, f"tucker2 x{fraction:g}" + (f", rank_multiple {multiple}" if multiple > 1 else ""),
                              ref, model, shape))
    for title, label, ref, model, shape in cases:
        ref_flops, flops = rankopt.count(ref, shape).flops, rankopt.count(model, shape).flops
        flop_x = ref_flops / flops
        cells = []
        for b in RUNTIME_BATCHES:
            rounds = args.rounds if b == 1 or ref_flops < 1e8 else max(3, args.rounds // 3)
            s = runtime_speeds(ref, model, (b, *shape[1:]), rounds)
            cells += [f"{s['eager']:.2f}", f"{s['ort']:.2f}", f"{s['eager'] / flop_x:.2f}", f"{s['ort'] / flop_x:.2f}",
                      f"{s['ref_eager_ms'] / s['ref_ort_ms']:.2f}"]
        rows.append([title, label, f"{flop_x:.2f}", *cells])
        print(rows[-1], flush=True)
    header = ["model", "compression", "FLOP reduction"]
    for b in RUNTIME_BATCHES:
        header += [f"eager speed-up @{b}", f"ORT speed-up @{b}", f"eager / FLOP red. @{b}",
                   f"ORT / FLOP red. @{b}", f"dense ORT vs eager @{b}"]
    return markdown_table(header, rows)


def latency_study(args: argparse.Namespace) -> str:
    """A small latency-objective study on ResNet-20 (CIFAR subset, ONNX Runtime, batch 1,
    rank_multiple 8); its front's speed-up over the reference in ORT vs FLOP reduction."""
    from _baselines import DATA

    from rankopt.compression.latency import measure_model_latency
    from rankopt.study import Study

    run_dir = args.out / "latency_study"
    config = {
        "name": "bench_latency_resnet20",
        "model": {"name": "resnet20_cifar"},
        "data": {"name": "npz", "batch_size": 64, "kwargs": {
            "train": "cifar10_train_1.npz", "val": "cifar10_train_5.npz", "root": str(DATA),
            "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616],
            "limit": {"train": args.study_train, "val": 500}}},
        "reference": {"epochs": 2, "lr": 0.1},
        "decomposers": ["tucker2"],
        "selectors": {"fixed": {"fraction": {"low": 0.1, "high": 0.8}}, "energy": {"p": {"low": 0.6, "high": 0.98}}},
        "strategies": {"finetune": {"epochs": 0.5, "lr": 0.01}},
        "objectives": ["accuracy", "latency"],
        "latency": {"runtime": "onnxruntime", "batch": 1, "threads": 1, "rounds": 9},
        "rank_multiple": 8,
        "keep_faster_layers": True,
        "sampler": {"name": "tpe", "seed": 0},
        "trials": args.study_trials,
        "device": "cpu",
        "run_dir": str(run_dir),
    }
    result = Study(config, progress=False).run()
    ref = result.reference
    shape = tuple(ref["input_shape"])
    reference = rankopt.model("resnet20_cifar", num_classes=10)
    reference.load_state_dict(torch.load(run_dir / "reference" / "model.pt", weights_only=True))
    rows = []
    for rec in sorted(result.front(), key=lambda r: r.latency_ratio or 0):
        model = result.load_model(rec.trial)
        again = measure_model_latency(model, reference, shape, runtime="onnxruntime", rounds=args.rounds)
        flop_x = ref["flops"] / rec.flops
        speed = 1.0 / again["latency_ratio"]
        rows.append([str(rec.trial), f"{rec.accuracy:.4f}", f"{rec.flops:,}", f"{flop_x:.2f}",
                     f"{1.0 / rec.latency_ratio:.2f}", f"{speed:.2f}", f"{speed / flop_x:.2f}", rec.ranks_summary])
        print(rows[-1], flush=True)
    text = (f"Reference: accuracy {ref['accuracy']:.4f}, {ref['flops']:,} FLOPs, "
            f"{ref.get('latency_ms', float('nan')):.3f} ms in ONNX Runtime at batch 1. "
            f"{len(result.trials())} trials, front of {len(rows)}.\n\n")
    return text + markdown_table(
        ["trial", "val acc", "FLOPs", "FLOP reduction", "ORT speed-up (in the study)",
         "ORT speed-up (timed again)", "speed-up / FLOP reduction @1", "ranks"], rows)


def runtimes_main(args: argparse.Namespace) -> None:
    import os

    torch.set_num_threads(1)
    load = "load average %.2f, %.2f, %.2f" % os.getloadavg()
    speeds = runtime_rows(args)
    study = latency_study(args)
    load_after = "%.2f, %.2f, %.2f" % os.getloadavg()
    text = (
        f"One thread, process CPU time, reference and model in eager and in ONNX Runtime timed "
        f"interleaved in one loop (medians of {args.rounds} rounds; ResNet-18 at batch 32: a third). "
        f"2-core machine, {load} before, "
        f"{load_after} after (1/5/15 min). Structure-only models: tucker2 at a fixed fraction of every 3x3 "
        "conv's ranks, the stem (<= 3 input channels) dense (speed does not depend on weight values).\n\n"
        + speeds + "\n\nLatency-objective study on ResNet-20 (objectives accuracy, latency; "
        "runtime onnxruntime, batch 1; rank_multiple 8; keep_faster_layers in ORT):\n\n" + study
    )
    from _record import report

    report("Realized speed in the serving runtime: eager vs ONNX Runtime, latency objective", text, args.record)


SWEEP_FRACTIONS = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)
SWEEP_LAYERS = ((16, 32), (32, 16), (64, 8))  # ResNet-20's 3x3 convs: channels, input side


def saving_sweep(args: argparse.Namespace) -> None:
    """One 3x3 conv of each ResNet-20 stage against Tucker-2 at a falling share of its
    ranks: the FLOP saving at which the factorized form starts to run faster in ONNX
    Runtime (what ``targets.min_saving`` should be for speed)."""
    import os

    import torch.nn as nn

    torch.set_num_threads(1)
    load = "%.2f, %.2f, %.2f" % os.getloadavg()
    rows = []
    for channels, side in SWEEP_LAYERS:
        torch.manual_seed(0)
        ref = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False)).eval()
        shape = (1, channels, side, side)
        for fraction in SWEEP_FRACTIONS:
            r = max(1, int(-(-fraction * channels // 1)))
            model = rankopt.compress(ref, {"0": {"decomposer": "tucker2", "ranks": [r, r]}}).eval()
            saving = 1 - rankopt.count(model, shape).flops / rankopt.count(ref, shape).flops
            cells = [f"{channels} ch, {side}x{side}", f"{r}x{r}", f"{saving:.1%}"]
            for b in RUNTIME_BATCHES:
                sp = runtime_speeds(ref, model, (b, *shape[1:]), args.rounds)
                cells += [f"{sp['eager']:.2f}", f"{sp['ort']:.2f}"]
            rows.append(cells)
            print(cells, flush=True)
    header = ["layer", "Tucker-2 ranks", "FLOPs saved"]
    for b in RUNTIME_BATCHES:
        header += [f"eager speed-up @{b}", f"ORT speed-up @{b}"]
    text = (f"One 3x3 conv (no bias) per ResNet-20 stage, dense against Tucker-2 at ranks "
            f"ceil(f * channels); one thread, process CPU time, interleaved, medians of "
            f"{args.rounds} rounds; load average {load} before, "
            + "%.2f, %.2f, %.2f" % os.getloadavg() + " after.\n\n" + markdown_table(header, rows))
    from _record import report

    report("Saving a factorized conv needs before it runs faster (targets.min_saving)", text, args.record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the models of a --quick front-quality run")
    parser.add_argument("--setting", choices=["mnist", "cifar", "all"], default="all")
    parser.add_argument("--device", default="cpu", help="cpu (default, the issue's measure), cuda, auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the front-quality run folder")
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--runtimes", action="store_true",
                        help="eager vs ONNX Runtime speed-ups and a latency-objective study (issue 14)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds (--runtimes)")
    parser.add_argument("--study-trials", type=int, default=10, help="trials of the latency study (--runtimes)")
    parser.add_argument("--study-train", type=int, default=2000, help="training images of the latency study")
    parser.add_argument("--saving-sweep", action="store_true",
                        help="speed of one conv against Tucker-2 at falling ranks (targets.min_saving)")
    args = parser.parse_args()
    if args.saving_sweep:
        return saving_sweep(args)
    if args.runtimes:
        return runtimes_main(args)
    from rankopt.training.devices import resolve_device

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    chosen = ["mnist", "cifar"] if args.setting == "all" else [args.setting]
    sections = []
    for key in chosen:
        setting = settings(args.quick)[key]
        if not (args.out / key / "picked.json").is_file():
            print(f"skipping {key}: no {args.out / key / 'picked.json'}; run bench_front_quality.py "
                  "with the same --out first", file=sys.stderr)
            continue
        text = measure_setting(setting, args.out, device, args.threads)
        print(text, flush=True)
        sections.append((key, text))
    if args.record and sections:
        from _record import invocation, record

        command = invocation()
        note = ("Models: for each method of the front-quality run, its fewest-params and "
                "fewest-FLOPs models within 1 point of the reference accuracy. A ratio "
                "speed-up / FLOP reduction of 1.00 means the FLOP saving is fully realized.")
        for key, text in sections:  # one section per setting, each replaced by its next run
            record(f"Realized speed of the picked models ({key})", note + "\n\n" + text, command)


if __name__ == "__main__":
    main()
