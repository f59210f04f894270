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
from rankopt.artifacts import load_compressed  # noqa: E402
from rankopt.surgery import LayerInfo  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the models of a --quick front-quality run")
    parser.add_argument("--setting", choices=["mnist", "cifar", "all"], default="all")
    parser.add_argument("--device", default="cpu", help="cpu (default, the issue's measure), cuda, auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the front-quality run folder")
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = parser.parse_args()
    from rankopt.devices import resolve_device

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
        sections.append(text)
    if args.record and sections:
        from _record import record

        command = ".venv/bin/python benchmarks/bench_realized_speed.py " + " ".join(
            a for a in sys.argv[1:] if a != "--record") + " --record"
        note = ("Models: for each method of the front-quality run, its fewest-params and "
                "fewest-FLOPs models within 1 point of the reference accuracy. A ratio "
                "speed-up / FLOP reduction of 1.00 means the FLOP saving is fully realized.")
        record("Realized speed of the picked models", note + "\n\n" + "\n\n".join(sections), command)


if __name__ == "__main__":
    main()
