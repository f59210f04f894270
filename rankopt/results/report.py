"""``rankopt report``: plots of the fronts, hypervolume over trials, per-layer ranks of a
chosen trial, and a Markdown summary, into ``RUN_DIR/report/``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rankopt.results.reading import StudyResult, TrialRecord, hypervolume_history, pareto_front_2d
from rankopt.core.safe_paths import atomic_write, atomic_write_text, make_dirs

__all__ = ["write_report", "front_table_rows", "layer_rows"]

MEASURES = (("params", "parameters"), ("flops", "FLOPs"))
_BUFFERS = {"running_mean", "running_var", "num_batches_tracked"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def searched_values(record: TrialRecord) -> dict[str, Any]:
    """The values the search chose for a trial's selector and strategy (``energy.p``,
    ``finetune.lr``); the fixed settings stay in the JSON output."""
    return dict(sorted(record.searched.items()))


def front_table_rows(
    records: Sequence[TrialRecord], test: Mapping[int, float] | None = None
) -> list[dict[str, Any]]:
    """The rows ``rankopt pareto`` and the summary show: the measures, the searched values
    as columns (empty where a trial's strategy or selector has no such value) and, given
    ``test`` accuracies, a ``test_accuracy`` column; ``latency_ms`` and the ``speedup`` over
    the reference (timed in the same loop) when latency was measured."""
    searched: list[str] = []
    for r in records:
        searched += [k for k in searched_values(r) if k not in searched]
    rows = []
    for r in records:
        row: dict[str, Any] = {"trial": r.trial, "accuracy": r.accuracy}
        if test is not None:
            row["test_accuracy"] = test.get(r.trial, "")
        row.update({
            "params": r.params,
            "flops": r.flops,
            "params_compression": r.params_compression,
            "flops_compression": r.flops_compression,
            "strategy": r.strategy,
            "selector": r.selector,
        })
        values = searched_values(r)
        row.update({k: values.get(k, "") for k in searched})
        row["ranks"] = r.ranks_summary
        row["fidelity"] = r.fidelity
        row["train_epochs"] = r.train_epochs
        rows.append(row)
    if any(r.latency_ms is not None for r in records):
        for row, r in zip(rows, records):
            row["latency_ms"] = r.latency_ms if r.latency_ms is not None else math.nan
            row["speedup"] = 1.0 / r.latency_ratio if r.latency_ratio else math.nan
    return rows


def layer_rows(result: StudyResult, record: TrialRecord) -> list[dict[str, Any]]:
    """Per target layer of ``record``: decomposer, ranks, params before and after.

    "After" counts the parameters of the factorized module in the trial's saved model.
    """
    from rankopt.deploy.artifacts import read_compressed

    # counted from the saved tensors: no model is rebuilt, so a run on a module passed
    # from Python reports without it
    state = read_compressed(result.local_model(record).model_path)["state_dict"]
    rows = []
    for layer in result.reference.get("layers", []):
        name = layer["name"]
        entry = record.spec.get(name)
        after = sum(
            t.numel() for k, t in state.items()
            if k.startswith(name + ".") and k.rsplit(".", 1)[-1] not in _BUFFERS
        )
        rows.append(
            {
                "layer": name,
                "shape": f"{layer['out_channels']}x{layer['in_channels']}x"
                + "x".join(str(k) for k in layer["kernel_size"]),
                "decomposer": entry["decomposer"] if entry else "(full)",
                "ranks": list(entry["ranks"]) if entry else [],
                "params_before": int(layer["params"]),
                "params_after": int(after),
            }
        )
    return rows


def _front_plot(plt: Any, result: StudyResult, records: Sequence[TrialRecord],
                front: Sequence[TrialRecord], test: Mapping[int, float], measure: str,
                label: str, out: Path) -> Path:
    """Accuracy against ``measure``: every trial, the study's front (the points of the
    ``pareto`` table, labelled with their trial numbers), the 2-D front of this pair of
    measures as a step line, test accuracies of the front when measured, the baseline."""
    from matplotlib.ticker import EngFormatter, LogLocator

    ref = result.reference
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    xs = [getattr(r, measure) for r in records]
    ys = [r.accuracy for r in records]
    ax.scatter(xs, ys, s=14, color="0.75", label="trials")
    line = sorted((xs[i], ys[i]) for i in pareto_front_2d(list(zip(ys, xs))))
    if line:
        ax.step([p[0] for p in line], [p[1] for p in line], where="post", color="C0", lw=1,
                alpha=0.6, label=f"best accuracy for its {label}")
    ax.scatter([getattr(r, measure) for r in front], [r.accuracy for r in front], s=30,
               color="C0", label="Pareto front (the pareto table)", zorder=4)
    for k, (point, trials) in enumerate(_labels(front, measure)):
        # trials at one point share a label; neighbours alternate above and below
        ax.annotate(",".join(map(str, trials)), point, textcoords="offset points",
                    xytext=(5, 5) if k % 2 == 0 else (5, -11), fontsize=8, color="C0")
    tested = [r for r in front if r.trial in test]
    if tested:
        ax.scatter([getattr(r, measure) for r in tested], [test[r.trial] for r in tested],
                   marker="x", s=36, color="C2", label="front, test accuracy", zorder=4)
    ax.scatter([ref[measure]], [ref["accuracy"]], marker="*", s=160, color="C3",
               label="baseline (uncompressed)", zorder=5)
    ax.set_xscale("log")
    # engineering notation (20k, 1.5M) on major ticks only: log minor labels overlap
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel(f"{label} (log scale)")
    ax.set_ylabel("validation accuracy" + (" (x: test)" if tested else ""))
    ax.set_title(f"{result.config.name}: accuracy vs {label}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _savefig(fig, out, dpi=110, metadata={"Description": "front trials " + " ".join(str(r.trial) for r in front)})
    plt.close(fig)
    return out


def _labels(front: Sequence[TrialRecord], measure: str) -> list[tuple[tuple[float, float], list[int]]]:
    """Front points by cost, each with the trials at exactly that point."""
    points: dict[tuple[float, float], list[int]] = {}
    for r in sorted(front, key=lambda r: (getattr(r, measure), r.accuracy)):
        points.setdefault((float(getattr(r, measure)), r.accuracy), []).append(r.trial)
    return list(points.items())


def _hypervolume_plot(plt: Any, result: StudyResult, records: Sequence[TrialRecord], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for measure, label in MEASURES:
        hist = hypervolume_history(records, result.reference, measure)
        ax.plot([h[0] for h in hist], [h[1] for h in hist], marker=".", label=f"accuracy x {label}")
    ax.set_xlabel("trial")
    ax.set_ylabel("normalized hypervolume")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, out, dpi=110)
    plt.close(fig)
    return out


def _ranks_plot(plt: Any, rows: Sequence[dict[str, Any]], record: TrialRecord, out: Path) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.4, 0.5 * len(rows) + 2), 6), sharex=True)
    names = [r["layer"] for r in rows]
    pos = range(len(rows))
    width = max((len(r["ranks"]) for r in rows), default=1) or 1
    for j in range(width):
        vals = [r["ranks"][j] if j < len(r["ranks"]) else 0 for r in rows]
        top.bar([p + (j - (width - 1) / 2) * 0.8 / width for p in pos], vals, 0.8 / width,
                label=f"rank {j + 1}")
    top.set_ylabel("rank")
    top.set_title(f"trial {record.trial}: per-layer ranks ({record.strategy}, {record.selector})")
    top.legend(fontsize=8)
    bottom.bar([p - 0.2 for p in pos], [r["params_before"] for r in rows], 0.4, label="original", color="0.6")
    bottom.bar([p + 0.2 for p in pos], [r["params_after"] for r in rows], 0.4, label="compressed", color="C0")
    bottom.set_ylabel("parameters")
    bottom.set_yscale("log")
    bottom.set_xticks(list(pos))
    long_names = max((len(n) for n in names), default=0) > 6
    bottom.set_xticklabels(names, rotation=45 if long_names else 0,
                           ha="right" if long_names else "center", fontsize=8)
    bottom.set_xlabel("layer")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, out, dpi=110)
    plt.close(fig)
    return out


def _optuna_front(plt: Any, result: StudyResult, out: Path) -> Path | None:
    """Optuna's own Pareto-front plot over the study's objectives (2 or 3 of them)."""
    from optuna.visualization.matplotlib import plot_pareto_front

    # three objectives make a 3-D scatter that cannot be read from a still image: the two
    # 2-D front plots show the same trials
    if len(result.config.objectives) != 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        ax = plot_pareto_front(result.study, target_names=list(result.config.objectives))
    fig = ax.get_figure()
    _savefig(fig, out, dpi=110)
    plt.close(fig)
    return out


def _md_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(fmt_value(c, r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def fmt_value(column: str, v: Any) -> str:
    """One format per kind of column: accuracies 4 decimals, ratios ``12.34x``, counts with
    thousands separators, searched values 4 significant digits."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        if "compression" in column:
            return f"{v:.2f}x"
        if "accuracy" in column:
            return f"{v:.4f}"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "/")


def front_test_accuracies(result: StudyResult, front: Sequence[TrialRecord]) -> dict[int, float] | None:
    """Test accuracies of the front: cached ones, the rest measured when the study file's
    data has a test split; None when there is no test split to measure on."""
    from rankopt.results.evaluation import cached_accuracies, config_splits, evaluate_trials

    have = cached_accuracies(result.run_dir, "test")
    missing = [r.trial for r in front if r.trial not in have]
    if missing and result.config.data.name is not None:
        if config_splits(result.config).test is None:
            return have or None
        have.update(evaluate_trials(result, missing, split="test"))
    return have or None


def _savefig(fig: Any, out: Path, **kwargs: Any) -> None:
    """``fig.savefig`` through a temporary and a rename, refusing a link at ``out``
    (a planted link never makes the report write outside its folder)."""
    atomic_write(out, lambda f: fig.savefig(f, format="png", **kwargs), root=out.parent)


def write_report(result: StudyResult, *, trial: int | None = None, out_dir: Path | None = None,
                 evaluate_test: bool = True) -> list[Path]:
    """Write the plots and ``summary.md``; returns the files written.

    ``trial`` chooses whose per-layer ranks are shown (default: the most accurate
    front point). ``evaluate_test``: add the front's test accuracies (measured once and
    cached in ``evaluation.json``) when the study's data has a test split.
    """
    from rankopt.core.errors import ConfigError

    plt = _pyplot()
    out_dir = Path(out_dir) if out_dir is not None else result.run_dir / "report"
    if out_dir == result.run_dir / "report":
        make_dirs(result.run_dir, out_dir)  # a link planted as report/ is refused
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
    records = result.trials()
    if not records:
        raise ConfigError(f"study {result.config.name!r} has no completed trial to report yet")
    front = result.front()
    chosen = result.pick(trial=trial) if trial is not None else max(front, key=lambda r: (r.accuracy, -r.params))
    rows = layer_rows(result, chosen)  # before any file: a failure leaves no half report
    test = front_test_accuracies(result, front) if evaluate_test else None
    files = [
        _front_plot(plt, result, records, front, test or {}, m, label, out_dir / f"front_{m}.png")
        for m, label in MEASURES
    ]
    files.append(_hypervolume_plot(plt, result, records, out_dir / "hypervolume.png"))
    files.append(_ranks_plot(plt, rows, chosen, out_dir / f"ranks_trial{chosen.trial}.png"))
    optuna_plot = _optuna_front(plt, result, out_dir / "pareto_front_optuna.png")
    if optuna_plot is not None:
        files.append(optuna_plot)
    status = result.status()
    ref = result.reference
    md = [
        f"# Study `{result.config.name}`\n",
        f"Baseline: accuracy {ref['accuracy']:.4f}, {ref['params']:,} params, {ref['flops']:,} FLOPs "
        f"({ref.get('obtained', '')})"
        + (f"; latency {ref['latency_ms']:.3f} ms in {ref.get('latency_runtime', 'eager')}"
           if ref.get("latency_ms") else "")
        + ".\n",
        "Trials: " + ", ".join(f"{k} {v}" for k, v in sorted(status["trials"].items())) + ".\n",
        "Normalized hypervolume: "
        + ", ".join(f"accuracy x {k} {v:.4f}" for k, v in status["hypervolume"].items())
        + ".\n",
        "## Pareto front\n",
        ("`accuracy` is validation accuracy (what the search optimized); `test_accuracy` is on "
         "the held-out test split.\n" if test else
         "All accuracies are validation numbers (what the search optimized): the study has no "
         "test split (set data.test_fraction, or give the dataset one).\n"),
        _md_table(front_table_rows(front, test)),
        "![accuracy vs params](front_params.png)\n\n![accuracy vs FLOPs](front_flops.png)\n\n"
        "![hypervolume over trials](hypervolume.png)\n",
        f"## Per-layer ranks of trial {chosen.trial}\n",
        f"Accuracy {chosen.accuracy:.4f}, {chosen.params:,} params "
        f"({chosen.params_compression:.2f}x fewer), {chosen.flops:,} FLOPs "
        f"({chosen.flops_compression:.2f}x fewer); strategy {chosen.strategy} "
        f"{chosen.hyperparameters}, selector {chosen.selector} {chosen.selector_params}.\n",
        _md_table(rows),
        f"![ranks](ranks_trial{chosen.trial}.png)\n",
    ]
    summary = out_dir / "summary.md"
    atomic_write_text(summary, "\n".join(md), root=out_dir)
    files.append(summary)
    return files
