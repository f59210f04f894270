"""Study engine timings: the quickstart's wall time, per-trial time outside training and
evaluation on both backends, and Ray trials per hour with 1 and 2 concurrent trials.

    .venv/bin/python benchmarks/bench_study.py

Prints the tables and appends them to benchmarks/RESULTS.md. Takes about 5 minutes on
a 2-core CPU machine.

Per trial, "in-trial overhead" is what :func:`rankopt.search.objective.run_trial`
spends outside ``ctx.train`` and ``ctx.evaluate`` (rank selection, decomposition,
counting, saving the model and metrics); "backend overhead" is the rest of the search's
wall time per trial (Optuna ask/tell and storage; for Ray also scheduling, worker
start-up and result transfer), from the Optuna trials' start/complete timestamps.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import rankopt  # noqa: E402
from _record import record  # noqa: E402
from rankopt.results.reading import StudyResult  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/bench_study.py"
RAY_TRIALS = 6


def tiny(run_dir: Path, **changes: Any) -> dict[str, Any]:
    """A small study for backend timings: small_cnn width 32 on digits, 1 fine-tuning epoch."""
    base = {
        "name": "bench",
        "model": {"name": "small_cnn", "kwargs": {"width": 32}},
        "data": {"name": "digits", "batch_size": 64},
        "reference": {"epochs": 2, "lr": 0.05},
        "decomposers": ["tucker2", "svd"],
        "selectors": {"energy": {"p": {"low": 0.6, "high": 0.95}}},
        "strategies": {"finetune": {"epochs": 1, "lr": 0.02}},
        "sampler": {"name": "random", "seed": 0},
        "trials": RAY_TRIALS,
        "run_dir": str(run_dir),
    }
    base.update(changes)
    return base


def search_figures(result: StudyResult) -> dict[str, float]:
    """Span of the search, per-trial times inside and outside training/evaluation."""
    trials = [t for t in result.study.trials if t.datetime_complete is not None]
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    metrics = [
        json.loads((result.run_dir / "trials" / str(t.number) / "metrics.json").read_text()) for t in trials
    ]
    n = len(metrics)
    trial_s = [m["seconds"] for m in metrics]
    return {
        "trials": n,
        "span_s": span,
        "trial_s": statistics.mean(trial_s),
        "train_eval_s": statistics.mean(m["train_seconds"] + m["eval_seconds"] for m in metrics),
        "in_trial_overhead_s": statistics.mean(m["overhead_seconds"] for m in metrics),
        "backend_overhead_s": max(0.0, span - sum(trial_s)) / n,
        "trials_per_hour": n / span * 3600.0,
    }


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench_study_"))

    # 1. the quickstart, as `make quickstart` runs it
    start = time.perf_counter()
    quick = rankopt.run_study(ROOT / "studies" / "quickstart.yaml", run_dir=str(tmp / "quickstart"))
    quick_wall = time.perf_counter() - start
    ref = quick.reference
    front = quick.front()
    good = [r for r in front if r.params * 3 <= ref["params"] and r.accuracy >= ref["accuracy"] - 0.02]
    best_small = min(good, key=lambda r: r.params) if good else None
    qf = search_figures(quick)
    quick_table = "\n".join(
        [
            "| trials | wall s | reference s | search s | front size | baseline acc | baseline params "
            "| smallest front point within 2 points (params x, acc) | hypervolume params / flops |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {qf['trials']} | {quick_wall:.1f} | {ref['seconds']:.1f} | {qf['span_s']:.1f} | {len(front)} "
            f"| {ref['accuracy']:.4f} | {ref['params']:,} | "
            + (
                f"trial {best_small.trial}: {best_small.params_compression:.2f}x, {best_small.accuracy:.4f}"
                if best_small
                else "none"
            )
            + " | "
            + " / ".join(f"{v:.3f}" for v in quick.hypervolume().values())
            + " |",
        ]
    )
    print(quick_table)

    # 2. per-trial overhead: local backend (same small study as the Ray runs)
    rows = []
    local = rankopt.run_study(tiny(tmp / "local"))
    rows.append(("local", 1, search_figures(local)))

    # 3. the Ray backend with 1 and 2 concurrent trials on a local 2-CPU Ray
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for concurrent in (1, 2):
            result = rankopt.run_study(
                tiny(tmp / f"ray{concurrent}", backend="ray", max_concurrent=concurrent)
            )
            rows.append(("ray", concurrent, search_figures(result)))
    finally:
        ray.shutdown()

    backend_table = "\n".join(
        [
            "| backend | concurrent trials | trials | search s | trial s (mean) | train+eval s "
            "| in-trial overhead s | backend overhead s per trial | trials per hour |",
            "|---|---|---|---|---|---|---|---|---|",
            *(
                f"| {name} | {conc} | {f['trials']} | {f['span_s']:.1f} | {f['trial_s']:.2f} "
                f"| {f['train_eval_s']:.2f} | {f['in_trial_overhead_s']:.3f} "
                f"| {f['backend_overhead_s']:.2f} | {f['trials_per_hour']:.0f} |"
                for name, conc, f in rows
            ),
        ]
    )
    print(backend_table)
    record(
        "Study engine: quickstart wall time, per-trial overhead, Ray throughput",
        "Quickstart (`studies/quickstart.yaml`, local backend, torch threads = resources.cpus = 1):\n\n"
        + quick_table
        + "\n\nBackends on a small study (small_cnn width 32 on digits, 1 fine-tuning epoch per "
        f"trial, {RAY_TRIALS} trials; Ray on a local 2-CPU instance, 1 CPU per trial). In-trial "
        "overhead = rank selection, decomposition, counting and saving; backend overhead = the "
        "search's wall time per trial beyond the trials themselves (Optuna ask/tell and storage; "
        "for Ray also scheduling, worker start-up and result transfer). With 2 concurrent trials "
        "the backend overhead column is not meaningful (trials overlap), trials per hour is:\n\n"
        + backend_table,
        COMMAND,
    )


if __name__ == "__main__":
    main()
