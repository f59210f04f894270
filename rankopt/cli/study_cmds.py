"""Study commands: ``run``, ``status``, ``pareto``, ``report``, ``pick``."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from rankopt.cli.app import app, console, err_console
from rankopt.safe_paths import check_output, disk_full_error, publish, temp_beside

FAILED_TRIALS_EXIT = 3  # `rankopt run` finished, but some of its trials failed
RUN_DIR_HELP = "A run directory written by `rankopt run` (e.g. runs/quickstart)."


def _check_format(value: str, allowed: tuple[str, ...]) -> None:
    from rankopt.errors import ConfigError

    if value not in allowed:
        raise ConfigError(f"--format must be one of {list(allowed)}, got {value!r}")


def _open(run_dir: Path) -> Any:
    from rankopt.results import StudyResult

    return StudyResult(run_dir)


def _print_front(records: list[Any], title: str, *, ranks: bool = False,
                 test: dict[int, float] | None = None) -> None:
    """The front as a table: compact by default (layers compressed), per-layer ranks with
    ``ranks``; the searched values as columns; test accuracies when measured."""
    from rankopt.report import fmt_value, front_table_rows

    rows = front_table_rows(records, test or None)
    fixed = {"trial", "accuracy", "test_accuracy", "params", "flops", "params_compression",
             "flops_compression", "strategy", "selector", "ranks", "latency_ms", "speedup",
             "fidelity", "train_epochs"}
    searched = [c for c in (rows[0] if rows else {}) if c not in fixed]
    timed = bool(rows) and "latency_ms" in rows[0]  # latency columns only when measured
    staged = any(row.get("fidelity") for row in rows)  # multi_fidelity promoted some model
    caption = ("accuracy: validation (what the search optimized); test acc: held-out test split"
               if test else "accuracy: validation (what the search optimized); "
               "held-out accuracy: `rankopt evaluate`")
    heads = ["trial", "accuracy"] + (["test acc"] if test else []) + [
        "params", "FLOPs", "params x", "FLOPs x"] + (["ms", "speed-up"] if timed else []) + [
        "strategy", "selector"] + (["fidelity", "epochs"] if staged else []) + searched
    body = []
    for row in rows:
        summary = row["ranks"]
        cells = [str(row["trial"]), f"{row['accuracy']:.4f}"]
        if test:
            cells.append(fmt_value("test_accuracy", row.get("test_accuracy")))
        cells += [f"{row['params']:,}", f"{row['flops']:,}", f"{row['params_compression']:.2f}",
                  f"{row['flops_compression']:.2f}"]
        if timed:
            cells += [f"{row['latency_ms']:.3f}", f"{row['speedup']:.2f}"]
        cells += [row["strategy"], row["selector"]]
        if staged:
            cells += [str(row["fidelity"]), f"{row['train_epochs']:g}"]
        cells += [fmt_value(c, row[c]) for c in searched]
        if ranks:
            cells.append(summary)
        else:  # "(3/4 layers)" at the end of the summary: how many layers were compressed
            cells.append(summary[summary.rfind("(") + 1:].rstrip(")") if "(" in summary else summary)
        body.append(cells)
    heads.append("ranks" if ranks else "layers")
    table = _fitted_table(title, caption, heads, body, searched)
    console.print(table)


def _fitted_table(title: str, caption: str, heads: list[str], body: list[list[str]], searched: list[str]) -> Table:
    """The front table at the console's width. Where all of it does not fit (an 80-column
    terminal) the searched values go (csv and json keep them), a strategy, selector, fidelity or
    epochs column with one value in every row moves to the caption, and the borders thin out, so that the figures are
    never cut to "0.9…"."""
    from rich import box

    widths = [max([len(col)] + [len(cells[i]) for cells in body]) for i, col in enumerate(heads)]
    shown = list(range(len(heads)))
    notes = [caption]
    narrow = sum(w + 3 for w in widths) + 1 > console.width
    if narrow:
        same = {i for i, col in enumerate(heads) if col in ("strategy", "selector", "fidelity", "epochs")
                and body and len({cells[i] for cells in body}) == 1}
        notes += [f"{heads[i]}: {body[0][i]}" for i in sorted(same)]
        shown = [i for i in shown if heads[i] not in searched and i not in same]
        if searched:
            notes.append(f"{len(searched)} searched values not shown at this width (see --format csv)")
    table = Table(title=title, caption="; ".join(notes), box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD,
                  pad_edge=not narrow)
    for i in shown:
        text = heads[i] in ("strategy", "selector", "ranks", "layers") or heads[i] in searched
        table.add_column(heads[i], overflow="fold", min_width=None if text else widths[i],
                         justify="left" if text else "right")
    for cells in body:
        table.add_row(*[cells[i] for i in shown])
    return table


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
        from rankopt.config import load_config, merge_set, parse_set

        sets = parse_set(set_)  # a malformed --set fails before the file is read
        loaded = load_config(study_file, check_plugins=False)  # paths resolved against the file
        source = merge_set(loaded.model_dump(mode="json", exclude_unset=True), sets)
        source.setdefault("name", loaded.name)
    study = Study(source, progress=False if quiet else None, **overrides)
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


@app.command("pareto")
def pareto_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    format: str = typer.Option("table", "--format", help="table, csv or json."),
    ranks: bool = typer.Option(False, "--ranks", help="Show each layer's decomposer and ranks (default: how many layers)."),
) -> None:
    """The Pareto front: accuracy, params, FLOPs, compression ratios, strategy, searched values."""
    from rankopt.evaluation import cached_accuracies

    _check_format(format, ("table", "csv", "json"))
    result = _open(run_dir)
    front = result.front()
    test = {r.trial: a for r, a in ((r, cached_accuracies(result.run_dir).get(r.trial)) for r in front)
            if a is not None}
    if format == "json":
        typer.echo(json.dumps([r.as_dict() for r in front], indent=2, default=_json_default))
    elif format == "csv":
        from rankopt.report import front_table_rows

        rows = front_table_rows(front, test or None)
        buf = io.StringIO()
        fields = list(rows[0]) if rows else ["trial", "accuracy", "params", "flops"]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        typer.echo(buf.getvalue(), nl=False)
    else:
        _print_front(front, f"Pareto front of {result.config.name} ({len(front)} points)",
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
    fold_bn: bool = typer.Option(
        False, "--fold-bn", help="Load as a model with BatchNorm folded into the preceding convs (checked to 1e-5)."
    ),
    keep_faster: bool = typer.Option(
        False, "--keep-faster", help="Time every decomposed layer against the dense layer it computes in the "
        "study's latency runtime and batch (eager by default) and write the slower ones dense: the same "
        "function, more params.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Write --out even among a run directory's own files (trials/, reference/, "
        "cache/); a study's storage (optuna.db) is never overwritten.",
    ),
) -> None:
    """Write one model off the front to a file that rankopt.load_compressed reads."""
    from rankopt.artifacts import read_compressed
    from rankopt.errors import ArtifactError

    result = _open(run_dir)
    record = result.pick(trial=trial, max_params=max_params, max_flops=max_flops, min_accuracy=min_accuracy)
    source = Path(record.model_path)
    if not source.is_file():
        raise ArtifactError(f"trial {record.trial}'s model file {str(source)!r} is missing")
    _check_out(out, source)
    check_output(out, force=force)  # never a run's own files; never a storage
    read_compressed(source)  # refuse to copy a torn or foreign file
    # a reader of --out never sees half a file: temporaries beside it, then one rename
    with temp_beside(out) as tmp:
        if keep_faster:
            with temp_beside(out) as dense:
                _write_faster(source, dense, result)
                if fold_bn:
                    _write_folded(dense, tmp, allow_modules=result.model_modules)
                else:
                    os.replace(dense, tmp)
        elif fold_bn:
            _write_folded(source, tmp, allow_modules=result.model_modules)
        else:
            _copy_into(source, tmp, out)
        publish(tmp, out)
    console.print(
        f"trial {record.trial}: accuracy {record.accuracy:.4f}, {record.params:,} params "
        f"({record.params_compression:.2f}x fewer), {record.flops:,} FLOPs -> {out}",
        highlight=False,
    )
    console.print(_held_out_line(result, record.trial), highlight=False)
    base = result.reference.get("base", {})
    if base.get("class"):
        console.print(f"load it with rankopt.load_compressed({str(out)!r}, model=...) given an "
                      f"uncompressed {base['class']} (the run used a module passed from Python)",
                      highlight=False)


def _copy_into(source: Path, tmp: Path, out: Path) -> None:
    """Copy ``source`` into the temporary ``tmp`` that :func:`temp_beside` made for ``out``
    (a full disk names ``out`` and the size needed)."""
    import errno

    try:
        with open(source, "rb") as src, os.fdopen(os.open(tmp, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)), "wb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(out, source.stat().st_size) from exc
        raise


def _held_out_line(result: Any, trial: int) -> str:
    """The picked model's test accuracy (measured and stored in evaluation.json), or a note
    that the numbers are validation numbers."""
    from rankopt.evaluation import cached_accuracies, config_splits

    cached = cached_accuracies(result.run_dir, "test")
    if trial not in cached and result.config.data.name is not None:
        if config_splits(result.config, "pick").test is not None:
            cached = result.evaluate(trial, split="test")
    if trial in cached:
        return (f"test accuracy {cached[trial]:.4f} on the held-out test split (stored in "
                f"{result.run_dir / 'evaluation.json'})")
    return ("accuracy above is a validation number (what the search optimized): the study has "
            "no test split; set data.test_fraction to hold one out")


def _write_folded(source: Path, out: Path, *, allow_modules: list[str]) -> None:
    """``source`` re-written with ``metadata.fold_bn`` after checking the folded model
    equals the unfolded one to 1e-5 on a seeded batch (``load_compressed`` folds)."""
    import torch

    from rankopt.artifacts import load_compressed, read_compressed, save_compressed
    from rankopt.errors import ExportError
    from rankopt.deploy import fold_batchnorm

    payload = read_compressed(source)
    if (payload.get("metadata") or {}).get("fold_bn"):  # folded already
        _copy_into(source, out, out)
        return
    model = load_compressed(source, allow_modules=allow_modules)
    shape = payload.get("input_shape") or []
    if shape:
        x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((fold_batchnorm(model)(x) - model(x)).abs().max())
        if not diff <= 1e-5:
            raise ExportError(f"folding BatchNorm changed the outputs by up to {diff:.3g} (> 1e-5); nothing written")
    metadata = {**(payload.get("metadata") or {}), "fold_bn": True}
    save_compressed(out, model, payload["spec"], base=payload["base"], input_shape=shape or None, metadata=metadata)


def _write_faster(source: Path, out: Path, result: Any) -> None:
    """``source`` re-written with the layers that run slower factorized than dense (in the
    study's ``latency`` runtime and batch) made dense again (``rankopt.densify``)."""
    from rankopt.artifacts import load_compressed, read_compressed, save_compressed
    from rankopt.cli.export_cmd import densify_slower

    payload = read_compressed(source)
    if (payload.get("metadata") or {}).get("fold_bn"):
        _copy_into(source, out, out)  # a folded file's layers are not the spec's any more
        console.print("--keep-faster: the trial's file has BatchNorm folded; written as it is", highlight=False)
        return
    shape = tuple(payload.get("input_shape") or ())
    if not shape:
        from rankopt.errors import ArtifactError

        raise ArtifactError(f"model file {str(source)!r} records no input shape, so its layers cannot be timed")
    latency = result.config.latency
    model, kept, slower = densify_slower(
        load_compressed(source, allow_modules=result.model_modules), source, payload, shape,
        runtime=latency.runtime, batch=latency.batch, threads=latency.threads, rounds=latency.rounds,
        allow_modules=result.model_modules, done="written dense")
    metadata = {**(payload.get("metadata") or {}), "dense_again": slower}
    save_compressed(out, model, kept, base=payload["base"], input_shape=shape, metadata=metadata)
    if slower:  # the line below names the trial's figures; the file differs from them
        from rankopt.accounting import count

        cost = count(model, shape)
        console.print(f"--keep-faster: the file holds {cost.params:,} params and {cost.flops:,} FLOPs with "
                      "those layers dense", highlight=False, soft_wrap=True)
    load_compressed(out, allow_modules=result.model_modules)  # the file must load as written


def _check_out(out: Path, source: Path) -> None:
    """``pick --out`` must name a new or replaceable file, not a folder or the trial's own file."""
    import os

    from rankopt.errors import ConfigError

    text = str(out)
    if not text.strip() or text in (".", "..") or text.endswith(("/", os.sep)):
        raise ConfigError(f"--out: {text!r} is not a file name; give a path such as model.pt")
    if out.is_dir():
        raise ConfigError(f"--out: {text!r} is a directory; give a file path such as {text}/model.pt")
    if out.exists() and out.resolve() == source.resolve():
        raise ConfigError(
            f"--out: {text!r} is the trial's own model file; give a path outside the run directory"
        )
    probe = out.parent if str(out.parent) else Path(".")
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK) or (
        out.exists() and not os.access(out, os.W_OK)
    ):
        raise ConfigError(f"--out: {text!r} cannot be written by this user; give a writable path")
