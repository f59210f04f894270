"""Fronts of the default search with and without refinement and data-aware decomposition.

    .venv/bin/python benchmarks/bench_refinement.py --quick --setting mnist --seeds 0 1 \\
        --trials 24 48 --ablate 24 --record          # 2-core CPU: ~40 min
    .venv/bin/python benchmarks/bench_refinement.py --quick --setting cifar --seeds 0 1 \\
        --trials 24 --ablate 24 --record             # 2-core CPU: ~60 min per study at N = 24

Every study is ``bench_front_quality``'s ``rankopt`` (the default search over energy,
per-layer fixed fractions, VBMF and budget with the one-shot proposals, distillation and
multi-fidelity) at N trials, on the same committed or cached reference. Variants:

- ``default``: as shipped (refinement on, data-aware decomposition on, ``rank_multiple: auto``);
- ``no_refinement``: ``refinement: null`` (the wrapped TPE proposes every own trial);
- ``no_data_aware``: ``calibration: null`` (weight-space decompositions and spectra);
- ``sequential_calibration``: ``calibration: {mode: sequential}`` (each layer fitted in forward
  order to the inputs the compressed layers before it give it; the default is ``independent``,
  every layer whitened by the reference's own inputs);
- ``rank_multiple_1``: exact ranks (what alignment costs or gains in accuracy).

Per study: hypervolumes (accuracy x params, accuracy x FLOPs, normalized by the
reference), fewest params and fewest FLOPs within 1 point of the reference accuracy, the
front's size and where its models came from (the enqueued proposals, the refining
sampler's moves, the wrapped sampler's own trials), repeats, and CPU time. The hand
methods of ``bench_front_quality`` (VBMF, energy sweep, fraction sweep, uniform sweeps) are
run once with ``--hand`` for the "highest hypervolume of all methods" comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _baselines import (  # noqa: E402
    HAND_METHODS,
    figures,
    markdown_table,
    method_config,
    missing_data,
    reference_weights,
    run_method,
    settings,
)

DEFAULT_OUT = Path("runs") / "bench_refinement"
VARIANTS = ("default", "no_refinement", "no_data_aware", "sequential_calibration", "rank_multiple_1")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


def study_config(setting: Any, variant: str, trials: int, seed: int, weights: Path, out: Path,
                 device: str) -> dict[str, Any]:
    cfg = method_config(setting, "rankopt", weights, out, device, seed)
    label = f"{variant}_n{trials}_s{seed}"
    cfg.update(name=f"{setting.key}_{label}", trials=trials, run_dir=str(out / setting.key / label))
    if variant == "no_refinement":
        cfg["refinement"] = None
    elif variant == "no_data_aware":
        cfg["calibration"] = None
    elif variant == "sequential_calibration":
        cfg["calibration"] = {"mode": "sequential"}
    elif variant == "rank_multiple_1":
        cfg["rank_multiple"] = 1
    elif variant != "default":
        raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
    return cfg


def origins(result: Any) -> dict[int, str]:
    """Trial number -> ``proposal`` (enqueued), ``refinement`` or ``sampler``; a continued
    model takes its source's origin."""
    out: dict[int, str] = {}
    by_number = {t.number: t for t in result.study.trials}
    for t in sorted(by_number.values(), key=lambda t: t.number):
        source = t.user_attrs.get("continued_from")
        if source is not None and int(source) in out:
            out[t.number] = out[int(source)]
        elif "fixed_params" in t.system_attrs:
            out[t.number] = "proposal"
        elif str(t.user_attrs.get("proposed_by", "")).startswith("refinement"):
            out[t.number] = "refinement"
        else:
            out[t.number] = "sampler"
    return out


def front_origins(records: list[Any], origin: dict[int, str]) -> dict[str, int]:
    """How many models of the (accuracy, params, FLOPs) front came from each origin (each
    model once, at its highest fidelity; repeats left out)."""
    superseded = {getattr(r, "continued_from", None) for r in records}
    models = [r for r in records if getattr(r, "repeat_of", None) is None and r.trial not in superseded]

    def dominated(a: Any) -> bool:
        return any(b.accuracy >= a.accuracy and b.params <= a.params and b.flops <= a.flops
                   and (b.accuracy > a.accuracy or b.params < a.params or b.flops < a.flops) for b in models)

    counts = {"proposal": 0, "refinement": 0, "sampler": 0}
    for r in models:
        if not dominated(r):
            counts[origin.get(r.trial, "sampler")] += 1
    return counts


def _read(cfg: dict[str, Any]) -> tuple[Any, float] | None:
    """A study as far as it ran (``--no-run``), or None when it never started."""
    from rankopt.results.reading import StudyResult

    if not (Path(cfg["run_dir"]) / "optuna.db").is_file():
        return None
    result = StudyResult(cfg["run_dir"])
    spent = sum((t.datetime_complete - t.datetime_start).total_seconds()
                for t in result.study.trials if t.datetime_complete and t.datetime_start)
    return result, spent


def run_one(setting: Any, variant: str, trials: int, seed: int, weights: Path, out: Path,
            device: str, run: bool = True) -> dict[str, Any] | None:
    cfg = study_config(setting, variant, trials, seed, weights, out, device)
    cpu, wall = _cpu(), time.perf_counter()
    if run:
        result, seconds = run_method(cfg)
    else:
        read = _read(cfg)
        if read is None:
            return None
        result, seconds = read
    cpu, wall = (_cpu() - cpu if run else float("nan")), time.perf_counter() - wall
    spent_file = Path(cfg["run_dir"]) / "bench_cpu.json"  # read back by --no-run
    if run:
        spent_file.write_text(json.dumps({"cpu_s": cpu}))
    elif spent_file.is_file():
        cpu = float(json.loads(spent_file.read_text())["cpu_s"])
    baseline = result.reference
    records = result.trials()
    fig = figures(variant, records, baseline, seconds)
    searched = sum(1 for t in result.study.trials if t.state.name == "COMPLETE"
                   and t.user_attrs.get("continued_from") is None)
    label = variant if searched >= trials else f"{variant} (partial: {searched} of {trials} searched)"
    row = {"variant": label, "trials": trials, "seed": seed, "fig": fig, "baseline": baseline,
           "front": front_origins(records, origins(result)), "cpu": cpu, "wall": wall}
    print(f"[{setting.key}] {variant} N={trials} seed {seed}: {fig} front {row['front']} cpu {cpu:.0f}s",
          flush=True)
    return row


def _count(value: int | None, base: int) -> str:
    return "none" if value is None else f"{value:,} ({base / value:.1f}x)"


def report(setting: Any, rows: list[dict[str, Any]], hand: list[Any]) -> str:
    base = rows[0]["baseline"]
    table = []
    for r in rows:
        f, fr = r["fig"], r["front"]
        total = sum(fr.values())
        own = fr["refinement"] + fr["sampler"]
        table.append([r["variant"], str(r["trials"]), str(r["seed"]), f"{f.hv_params:.4f}", f"{f.hv_flops:.4f}",
                      _count(f.best_params, base["params"]), _count(f.best_flops, base["flops"]),
                      f"{total}: {fr['proposal']} / {fr['refinement']} / {fr['sampler']}"
                      + (f" ({own / total:.0%} own)" if total else ""),
                      str(f.repeats), "-" if r["cpu"] != r["cpu"] else f"{r['cpu']:.0f}"])
    for f in hand:
        table.append([f"hand: {f.method}", str(f.trials), "-", f"{f.hv_params:.4f}", f"{f.hv_flops:.4f}",
                      _count(f.best_params, base["params"]), _count(f.best_flops, base["flops"]),
                      "-", str(f.repeats), f"{f.seconds:.0f} (trials' s)"])
    text = (f"{setting.describe().rsplit(', N = ', 1)[0]}. Reference: accuracy {base['accuracy']:.4f}, {base['params']:,} params, "
            f"{base['flops']:,} FLOPs.\n\n" + markdown_table(
                ["study", "N", "sampler seed", "HV (acc, params)", "HV (acc, FLOPs)",
                 "fewest params within 1 pt", "fewest FLOPs within 1 pt",
                 "front: proposals / refinement / sampler", "repeats", "CPU s"], table))
    means = []
    for variant in VARIANTS:
        for n in sorted({r["trials"] for r in rows}):
            sel = [r for r in rows if r["variant"] == variant and r["trials"] == n]
            if len(sel) > 1:
                means.append([variant, str(n), str(len(sel)),
                              f"{statistics.mean(r['fig'].hv_params for r in sel):.4f}",
                              f"{statistics.mean(r['fig'].hv_flops for r in sel):.4f}"])
    if means:
        text += "\n\nMeans over sampler seeds:\n\n" + markdown_table(
            ["study", "N", "seeds", "mean HV (acc, params)", "mean HV (acc, FLOPs)"], means)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized data, epochs (see _baselines.settings)")
    parser.add_argument("--setting", choices=["mnist", "cifar"], required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trials", type=int, nargs="*", default=[24, 48], help="N of the default studies")
    parser.add_argument("--ablate", type=int, nargs="*", default=[24],
                        help="N at which the ablations run (first seed only)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS[1:], default=list(VARIANTS[1:]),
                        help="the ablations to run")
    parser.add_argument("--hand", action="store_true", help="also run the hand methods once")
    parser.add_argument("--no-run", action="store_true",
                        help="only report the studies as far as they ran (a partial study is marked)")
    parser.add_argument("--record", action="store_true", help="replace this setting's section of RESULTS.md")
    args = parser.parse_args()

    setting = settings(args.quick)[args.setting]
    absent = missing_data(setting)
    if absent:
        sys.exit(f"{absent} not found in ../shared/data (see its README)")
    weights = reference_weights(setting, args.out, args.device)
    run = not args.no_run
    rows = []
    for n in args.trials:
        for seed in args.seeds:
            rows.append(run_one(setting, "default", n, seed, weights, args.out, args.device, run))
    for n in args.ablate:
        for variant in args.variants:
            rows.append(run_one(setting, variant, n, args.seeds[0], weights, args.out, args.device, run))
    rows = [r for r in rows if r is not None]
    hand = []
    if args.hand:
        for method in HAND_METHODS:
            cfg = method_config(setting, method, weights, args.out, args.device)
            read = run_method(cfg) if run else _read(cfg)
            if read is not None:
                hand.append(figures(method, read[0].trials(), read[0].reference, read[1]))
    if not rows and not hand:
        return
    text = report(setting, rows, hand)
    print(text)
    if args.record:
        import os

        from _record import invocation, record

        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        record(f"Refinement and data-aware ablations: fronts ({args.setting})",
               text + f"\n\nLoad average at the end: {load} (accuracies are deterministic; CPU "
               "seconds are not). Front: the non-dominated (accuracy, params, FLOPs) models, each at "
               "its highest fidelity; 'own' = refinement + sampler. Ablations on the first seed.",
               invocation())


if __name__ == "__main__":
    main()
