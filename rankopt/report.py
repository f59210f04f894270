"""``rankopt report``: plots of the fronts, hypervolume over trials, per-layer ranks of a
chosen trial, and a Markdown summary, into ``RUN_DIR/report/``."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rankopt.results import StudyResult, TrialRecord, hypervolume_history, pareto_front_2d

__all__ = ["write_report", "front_table_rows", "layer_rows"]

MEASURES = (("params", "parameters"), ("flops", "FLOPs"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def front_table_rows(records: Sequence[TrialRecord]) -> list[dict[str, Any]]:
    """The rows ``rankopt pareto`` and the summary show."""
    return [
        {
            "trial": r.trial,
            "accuracy": r.accuracy,
            "params": r.params,
            "flops": r.flops,
            "params_compression": r.params_compression,
            "flops_compression": r.flops_compression,
            "strategy": r.strategy,
            "selector": r.selector,
            "ranks": r.ranks_summary,
        }
        for r in records
    ]


def layer_rows(result: StudyResult, record: TrialRecord) -> list[dict[str, Any]]:
    """Per target layer of ``record``: decomposer, ranks, params before and after.

    "After" counts the parameters of the factorized module in the trial's saved model.
    """
    from rankopt.artifacts import load_compressed

    model = load_compressed(result.local_model(record).model_path)
    rows = []
    for layer in result.reference.get("layers", []):
        name = layer["name"]
        entry = record.spec.get(name)
        after = sum(p.numel() for p in model.get_submodule(name).parameters())
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


def _front_plot(plt: Any, result: StudyResult, records: Sequence[TrialRecord], measure: str,
                label: str, out: Path) -> Path:
    ref = result.reference
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [getattr(r, measure) for r in records]
    ys = [r.accuracy for r in records]
    ax.scatter(xs, ys, s=14, color="0.7", label="trials")
    front = sorted((xs[i], ys[i]) for i in pareto_front_2d(list(zip(ys, xs))))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="C0")
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=28, color="C0",
                   label=f"front (accuracy, {label})")
    ax.scatter([ref[measure]], [ref["accuracy"]], marker="*", s=160, color="C3",
               label="baseline (uncompressed)", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{result.config.name}: accuracy vs {label}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
    fig.savefig(out, dpi=110)
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
    bottom.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _optuna_front(plt: Any, result: StudyResult, out: Path) -> Path | None:
    """Optuna's own Pareto-front plot over the study's objectives (2 or 3 of them)."""
    from optuna.visualization.matplotlib import plot_pareto_front

    if len(result.config.objectives) not in (2, 3):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning
        ax = plot_pareto_front(result.study, target_names=list(result.config.objectives))
    fig = ax.get_figure()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _md_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if v < 10 else f"{v:.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v).replace("|", "/")


def write_report(result: StudyResult, *, trial: int | None = None, out_dir: Path | None = None) -> list[Path]:
    """Write the plots and ``summary.md``; returns the files written.

    ``trial`` chooses whose per-layer ranks are shown (default: the most accurate
    front point).
    """
    from rankopt.errors import ConfigError

    plt = _pyplot()
    out_dir = Path(out_dir) if out_dir is not None else result.run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    records = result.trials()
    if not records:
        raise ConfigError(f"study {result.config.name!r} has no completed trial to report yet")
    front = result.front()
    chosen = result.pick(trial=trial) if trial is not None else max(front, key=lambda r: (r.accuracy, -r.params))
    files = [
        _front_plot(plt, result, records, m, label, out_dir / f"front_{m}.png") for m, label in MEASURES
    ]
    files.append(_hypervolume_plot(plt, result, records, out_dir / "hypervolume.png"))
    rows = layer_rows(result, chosen)
    files.append(_ranks_plot(plt, rows, chosen, out_dir / f"ranks_trial{chosen.trial}.png"))
    optuna_plot = _optuna_front(plt, result, out_dir / "pareto_front_optuna.png")
    if optuna_plot is not None:
        files.append(optuna_plot)
    status = result.status()
    ref = result.reference
    md = [
        f"# Study `{result.config.name}`\n",
        f"Baseline: accuracy {ref['accuracy']:.4f}, {ref['params']:,} params, {ref['flops']:,} FLOPs "
        f"({ref.get('obtained', '')}).\n",
        "Trials: " + ", ".join(f"{k} {v}" for k, v in sorted(status["trials"].items())) + ".\n",
        "Normalized hypervolume: "
        + ", ".join(f"accuracy x {k} {v:.4f}" for k, v in status["hypervolume"].items())
        + ".\n",
        "## Pareto front\n",
        _md_table(front_table_rows(front)),
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
    summary.write_text("\n".join(md))
    files.append(summary)
    return files
