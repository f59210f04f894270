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


@app.command("pick")
def pick_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    out: Path = typer.Option(..., "--out", help="The compressed-model file to write."),
    trial: Optional[int] = typer.Option(None, "--trial", help="Pick this trial."),
    max_params: Optional[float] = typer.Option(None, "--max-params", help="The most accurate model with at most this many parameters."),
    max_flops: Optional[float] = typer.Option(None, "--max-flops", help="The most accurate model with at most this many FLOPs."),
    min_accuracy: Optional[float] = typer.Option(None, "--min-accuracy", help="The smallest model at least this accurate (a fraction, e.g. 0.95)."),
    fold_bn: bool = typer.Option(
        False, "--fold-bn", help="Load as a model with BatchNorm folded into the preceding convs (checked to 1e-5)."
    ),
    keep_faster: bool = typer.Option(
        False, "--keep-faster", help="Time every decomposed layer against the dense layer it computes in the "
        "study's latency runtime and batch (eager by default) and write the slower ones dense: the same "
        "function, more params.",
    ),
    allow_unchecked: bool = typer.Option(
        False, "--allow-unchecked", help="Accept a trial file without a checksum or without the study and "
        "trial that wrote it (written by an older rankopt), with a warning.",
    ),
) -> None:
    """Write one model off the front to a file that rankopt.load_compressed reads.

    The trial's file is checked to be that trial's (study, trial number and spec as the
    storage recorded them) and loaded before anything is written.
    """
    from rankopt.core.errors import ArtifactError
    from rankopt.deploy.picking import LatencySettings, write_picked

    from rankopt.cli.empty_run import refuse_empty_run

    result = _open(run_dir)
    refuse_empty_run(result)
    record = result.pick(trial=trial, max_params=max_params, max_flops=max_flops, min_accuracy=min_accuracy)
    source = Path(result.local_model(record).model_path)
    if not source.is_file():
        raise ArtifactError(f"trial {record.trial}'s model file {str(source)!r} is missing")
    # refuse to copy a torn, foreign or swapped file; and it must load
    _loads(result.trial_payload(record, allow_unchecked=allow_unchecked), source, result)
    latency = result.config.latency
    picked = write_picked(
        source, out, fold_bn=fold_bn, allow_modules=result.model_modules, allow_unchecked=allow_unchecked,
        module_folders=result.model_folders,
        keep_faster=LatencySettings(latency.runtime, latency.batch, latency.threads, latency.rounds)
        if keep_faster else None,
    )
    for line in picked.notes:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(
        f"trial {record.trial}: accuracy {record.accuracy:.4f}, {record.params:,} params "
        f"({record.params_compression:.2f}x fewer), {record.flops:,} FLOPs -> {out}",
        highlight=False,
    )
    console.print(_held_out_line(result, record.trial, allow_unchecked=allow_unchecked), highlight=False)
    base = result.reference.get("base", {})
    if base.get("class"):
        console.print(f"load it with rankopt.load_compressed({str(out)!r}, model=...) given an "
                      f"uncompressed {base['class']} (the run used a module passed from Python)",
                      highlight=False)


def _loads(payload: Any, source: Path, result: Any) -> None:
    """Build the model of a checked trial file (a run on a module passed from Python
    cannot be rebuilt here: its tensors were checked against the spec only)."""
    from rankopt.deploy.artifacts import build_compressed

    base = payload.get("base") or {}
    if base.get("model") or base.get("callable"):
        build_compressed(payload, source, allow_modules=result.model_modules, module_folders=result.model_folders)


def _held_out_line(result: Any, trial: int, *, allow_unchecked: bool = False) -> str:
    """The picked model's test accuracy (measured and stored in evaluation.json), or a note
    that the numbers are validation numbers."""
    from rankopt.results.evaluation import cached_accuracies, config_splits

    cached = cached_accuracies(result.run_dir, "test")
    if trial not in cached and result.config.data.name is not None:
        if config_splits(result.config, "pick").test is not None:
            cached = result.evaluate(trial, split="test", allow_unchecked=allow_unchecked)
    if trial in cached:
        return (f"test accuracy {cached[trial]:.4f} on the held-out test split (stored in "
                f"{result.run_dir / 'evaluation.json'})")
    if result.config.data.name is None:  # data passed from Python: its test split is not on disk
        return ("accuracy above is a validation number; the run's data came from Python, so measure "
                f"the test split there: StudyResult({str(result.run_dir)!r}).evaluate({trial}, data=splits)")
    return ("accuracy above is a validation number (what the search optimized): the study has "
            "no test split; set data.test_fraction to hold one out")


