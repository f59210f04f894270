"""Study commands: ``run``, ``status``, ``pareto``, ``report``, ``pick``."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from rankopt.cli.app import app, console

FAILED_TRIALS_EXIT = 3  # `rankopt run` finished, but some of its trials failed
RUN_DIR_HELP = "A run directory written by `rankopt run` (e.g. runs/quickstart)."


def _check_format(value: str, allowed: tuple[str, ...]) -> None:
    from rankopt.errors import ConfigError

    if value not in allowed:
        raise ConfigError(f"--format must be one of {list(allowed)}, got {value!r}")


def _open(run_dir: Path) -> Any:
    from rankopt.results import StudyResult

    return StudyResult(run_dir)


def _print_front(records: list[Any], title: str) -> None:
    from rankopt.report import front_table_rows

    table = Table(title=title)
    for col in ("trial", "accuracy", "params", "FLOPs", "params x", "FLOPs x", "strategy"):
        table.add_column(col, no_wrap=True, justify="left" if col == "strategy" else "right")
    table.add_column("ranks", overflow="fold")
    for row in front_table_rows(records):
        ranks = row["ranks"] if len(row["ranks"]) <= 80 else row["ranks"][:77] + "..."
        table.add_row(
            str(row["trial"]),
            f"{row['accuracy']:.4f}",
            f"{row['params']:,}",
            f"{row['flops']:,}",
            f"{row['params_compression']:.2f}",
            f"{row['flops_compression']:.2f}",
            row["strategy"],
            ranks,
        )
    # piped into a file or a pager, keep each row on one line rather than folding at 80
    (console if console.is_terminal else Console(width=200)).print(table)


@app.command("run")
def run_command(
    study_file: Path = typer.Argument(..., help="The study file (YAML), e.g. studies/quickstart.yaml."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Where results go (default runs/<study name>)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="local (default) or ray."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Total number of trials wanted."),
    address: Optional[str] = typer.Option(None, "--address", help="Address of an existing Ray cluster (or RAY_ADDRESS)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop starting trials after this many seconds."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
) -> None:
    """Run (or continue) a study: train the reference once, search, print the front."""
    from rankopt.study import Study

    overrides: dict[str, Any] = {
        "run_dir": str(run_dir) if run_dir is not None else None,
        "backend": backend,
        "trials": trials,
        "address": address,
        "timeout": timeout,
    }
    study = Study(study_file, progress=False if quiet else None, **overrides)
    result = study.run()
    status = result.status()
    if not quiet:
        _print_front(result.front(), f"Pareto front of {result.config.name}")
        counts = ", ".join(f"{k} {v}" for k, v in sorted(status["trials"].items()))
        ref = status["reference"]
        console.print(
            f"baseline accuracy {ref['accuracy']:.4f}, {ref['params']:,} params; trials: {counts}; "
            f"hypervolume params {status['hypervolume']['params']:.4f}, "
            f"flops {status['hypervolume']['flops']:.4f}; results in {result.run_dir}",
            highlight=False,
        )
    if study.failed_trials:
        # the study went on, but say so in the exit status (3: finished with failed trials)
        number, reason = study.failed_trials[-1]
        Console(stderr=True).print(
            f"warning: {len(study.failed_trials)} trial(s) failed in this run (replaced where "
            f"the count allowed); the last, trial {number}: {reason}",
            highlight=False, soft_wrap=True,
        )
        raise typer.Exit(FAILED_TRIALS_EXIT)


@app.command("status")
def status_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    format: str = typer.Option("table", "--format", help="table or json."),
) -> None:
    """Trials by state, the baseline, the front size and the hypervolume."""
    _check_format(format, ("table", "json"))
    status = _open(run_dir).status()
    if format == "json":
        console.print_json(json.dumps(status))
        return
    table = Table(title=f"study {status['study']}", show_header=False)
    ref = status["reference"]
    table.add_row("baseline", f"accuracy {ref['accuracy']:.4f}, {ref['params']:,} params, {ref['flops']:,} FLOPs")
    table.add_row("trials", ", ".join(f"{k} {v}" for k, v in sorted(status["trials"].items())) or "(none)")
    table.add_row("wanted", str(status["trials_wanted"]))
    table.add_row("front size", str(status["front_size"]))
    hv = status["hypervolume"]
    table.add_row("hypervolume", f"accuracy x params {hv['params']:.4f}, accuracy x FLOPs {hv['flops']:.4f}")
    console.print(table)


@app.command("pareto")
def pareto_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    format: str = typer.Option("table", "--format", help="table, csv or json."),
) -> None:
    """The Pareto front: accuracy, params, FLOPs, compression ratios, strategy, ranks."""
    _check_format(format, ("table", "csv", "json"))
    result = _open(run_dir)
    front = result.front()
    if format == "json":
        typer.echo(json.dumps([r.as_dict() for r in front], indent=2, default=_json_default))
    elif format == "csv":
        from rankopt.report import front_table_rows

        rows = front_table_rows(front)
        buf = io.StringIO()
        fields = list(rows[0]) if rows else ["trial", "accuracy", "params", "flops"]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(buf.getvalue(), nl=False)
    else:
        _print_front(front, f"Pareto front of {result.config.name} ({len(front)} points)")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    trial: Optional[int] = typer.Option(None, "--trial", help="Whose per-layer ranks to plot (default: the most accurate front point)."),
) -> None:
    """Write plots (fronts, hypervolume, per-layer ranks) and summary.md into RUN_DIR/report/."""
    from rankopt.report import write_report

    files = write_report(_open(run_dir), trial=trial)
    for f in files:
        console.print(str(f), highlight=False)


@app.command("pick")
def pick_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    out: Path = typer.Option(..., "--out", help="The compressed-model file to write."),
    trial: Optional[int] = typer.Option(None, "--trial", help="Pick this trial."),
    max_params: Optional[float] = typer.Option(None, "--max-params", help="The most accurate model with at most this many parameters."),
    max_flops: Optional[float] = typer.Option(None, "--max-flops", help="The most accurate model with at most this many FLOPs."),
    min_accuracy: Optional[float] = typer.Option(None, "--min-accuracy", help="The smallest model at least this accurate (a fraction, e.g. 0.95)."),
) -> None:
    """Write one model off the front to a file that rankopt.load_compressed reads."""
    from rankopt.artifacts import read_compressed
    from rankopt.errors import ArtifactError

    result = _open(run_dir)
    record = result.pick(trial=trial, max_params=max_params, max_flops=max_flops, min_accuracy=min_accuracy)
    source = Path(record.model_path)
    if not source.is_file():
        raise ArtifactError(f"trial {record.trial}'s model file {str(source)!r} is missing")
    read_compressed(source)  # refuse to copy a torn or foreign file
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out)
    console.print(
        f"trial {record.trial}: accuracy {record.accuracy:.4f}, {record.params:,} params "
        f"({record.params_compression:.2f}x fewer), {record.flops:,} FLOPs -> {out}",
        highlight=False,
    )
