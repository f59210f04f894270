"""Study commands: ``run``, ``status``, ``pareto``, ``report``, ``pick``."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from rankopt.cli.app import app, console, err_console
from rankopt.cli.front_table import print_front

FAILED_TRIALS_EXIT = 3  # `rankopt run` finished, but some of its trials failed
RUN_DIR_HELP = "A run directory written by `rankopt run` (e.g. runs/quickstart)."


def _check_format(value: str, allowed: tuple[str, ...]) -> None:
    from rankopt.core.errors import ConfigError

    if value not in allowed:
        raise ConfigError(f"--format must be one of {list(allowed)}, got {value!r}")


def _open(run_dir: Path) -> Any:
    from rankopt.results.reading import StudyResult

    return StudyResult(run_dir)


@app.command("run")
def run_command(
    study_file: Path = typer.Argument(..., help="The study file (YAML), e.g. studies/quickstart.yaml."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Where results go (default runs/<study name>)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="local or ray (default: the study file's backend, else local)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Total number of trials wanted."),
    address: Optional[str] = typer.Option(None, "--address", help="Address of an existing Ray cluster (or RAY_ADDRESS)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop starting trials after this many seconds."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display."),
    set_: list[str] = typer.Option([], "--set", help="Override any study-file field: key.sub=value (YAML value), repeatable, e.g. --set sampler.seed=3."),
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
    source: Any = study_file
    if set_:
        from rankopt.config.schema import load_config, merge_set, parse_set

        sets = parse_set(set_)  # a malformed --set fails before the file is read
        loaded = load_config(study_file, check_plugins=False)  # paths resolved against the file
        source = merge_set(loaded.model_dump(mode="json", exclude_unset=True), sets)
        source.setdefault("name", loaded.name)
    study = Study(source, progress=False if quiet else None, **overrides)
    result = study.run()
    status = result.status()
    if not quiet:
        print_front(result.front(), f"Pareto front of {result.config.name}")
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
        err_console.print(
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
    from rankopt.cli.empty_run import empty_run_message

    _check_format(format, ("table", "json"))
    result = _open(run_dir)
    empty = empty_run_message(result)
    if empty is not None and not reference_path(result.run_dir).is_file():
        if format == "json":  # what is known: no reference, the trials' states
            typer.echo(json.dumps({"study": result.config.name, "reference": None,
                                   "trials": _state_counts(result), "message": empty}))
        else:
            console.print(empty, highlight=False, soft_wrap=True)
        return
    status = result.status()
    if format == "json":
        console.print_json(json.dumps(status))
        return
    table = Table(title=f"study {status['study']}", show_header=False)
    ref = status["reference"]
    table.add_row("baseline", f"accuracy {ref['accuracy']:.4f}, {ref['params']:,} params, {ref['flops']:,} FLOPs")
    table.add_row("trials", ", ".join(f"{k} {v}" for k, v in sorted(status["trials"].items())) or "(none)")
    table.add_row("wanted", str(status["trials_wanted"]))
    for run in status.get("running", []):
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in run["params"].items())
        table.add_row(f"running {run['trial']}", values or "(choosing its values)")
    table.add_row("front size", str(status["front_size"]))
    table.add_row("repeats", f"{status.get('repeats', 0)} (reported an earlier trial's result)")
    if status.get("front_fidelity"):
        table.add_row("front fidelity", ", ".join(
            f"{n} at fidelity {k}" for k, n in status["front_fidelity"].items()))
    hv = status["hypervolume"]
    table.add_row("hypervolume", f"accuracy x params {hv['params']:.4f}, accuracy x FLOPs {hv['flops']:.4f}")
    console.print(table)


def _state_counts(result: Any) -> dict[str, int]:
    from rankopt.core.errors import ConfigError

    counts: dict[str, int] = {}
    try:
        for t in result.study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
    except ConfigError:
        pass
    return counts


def reference_path(run_dir: Path) -> Path:
    from rankopt.results.reading import reference_path as path

    return path(run_dir)


@app.command("pareto")
def pareto_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    format: str = typer.Option("table", "--format", help="table, csv or json."),
    ranks: bool = typer.Option(False, "--ranks", help="Show each layer's decomposer and ranks (default: how many layers)."),
) -> None:
    """The Pareto front: accuracy, params, FLOPs, compression ratios, strategy, searched values."""
    from rankopt.results.evaluation import cached_accuracies

    from rankopt.cli.empty_run import refuse_empty_run

    _check_format(format, ("table", "csv", "json"))
    result = _open(run_dir)
    refuse_empty_run(result)
    front = result.front()
    cached = cached_accuracies(result.run_dir)  # read (and each file hashed) once
    test = {r.trial: cached[r.trial] for r in front if r.trial in cached}
    if format == "json":
        typer.echo(json.dumps([r.as_dict() for r in front], indent=2, default=_json_default))
    elif format == "csv":
        from rankopt.results.report import front_table_rows

        rows = front_table_rows(front, test or None)
        buf = io.StringIO()
        fields = list(rows[0]) if rows else ["trial", "accuracy", "params", "flops"]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(buf.getvalue(), nl=False)
    else:
        print_front(front, f"Pareto front of {result.config.name} ({len(front)} points)",
                     ranks=ranks, test=test)


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
    from rankopt.cli.empty_run import refuse_empty_run
    from rankopt.results.report import write_report

    result = _open(run_dir)
    refuse_empty_run(result)
    files = write_report(result, trial=trial)
    for f in files:
        console.print(str(f), highlight=False)
