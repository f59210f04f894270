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
from rich.table import Table

from rankopt.cli.app import app, console, err_console

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
    body, compact = [], []
    abbrev: dict[str, str] = {}
    for record in records:
        for entry in record.spec.values():
            abbrev.setdefault(entry["decomposer"], _ABBREV.get(entry["decomposer"], entry["decomposer"] + ":"))
    for row, record in zip(rows, records):
        summary = row["ranks"]
        if ranks:  # "T5x10 T10x10 S12": one short token per compressed layer, in order
            compact.append(" ".join(abbrev[e["decomposer"]] + "x".join(str(r) for r in e["ranks"])
                                    for e in record.spec.values()) or "none")
        else:  # "3/3": the column says "layers"
            compact.append(summary[summary.rfind("(") + 1:].rstrip(")").removesuffix(" layers")
                           if "(" in summary else summary)
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
    legend = ("ranks: " + ", ".join(f"{a.rstrip(':')} = {d}" for d, a in abbrev.items() if a != d + ":")
              + " (per compressed layer, in order)") if ranks and abbrev else ""
    table = _fitted_table(title, caption, heads, body, searched, narrow_last=(compact, legend))
    console.print(table)


# short names of the built-in decomposers in the compact --ranks column of a narrow table
_ABBREV = {"tucker2": "T", "svd": "S", "cp": "C", "tt": "TT"}


def _fitted_table(title: str, caption: str, heads: list[str], body: list[list[str]], searched: list[str],
                  narrow_last: tuple[list[str], str] | None = None) -> Any:
    """The front table at the console's width, one line per row. Where all of it does not
    fit (an 80-column terminal) the last column takes its short form (``narrow_last``:
    "3/3", compact ranks), the searched values go (csv and json keep them), a strategy,
    selector, fidelity or epochs column with one value in every row moves to the caption,
    the borders thin out, and while it is still too wide the ratio columns, then the
    selector, go too (named in the caption), so that the figures are never cut to "0.9…".
    The caption is printed under the table, wrapped at words at the console's width."""
    from rich import box
    from rich.console import Group
    from rich.text import Text

    widths = [max([len(col)] + [len(cells[i]) for cells in body]) for i, col in enumerate(heads)]
    shown = list(range(len(heads)))
    notes = [caption]
    narrow = sum(w + 3 for w in widths) + 1 > console.width
    if narrow and narrow_last is not None:  # the last column's short form ("3/3", "T5x10 S12")
        cells, legend = narrow_last
        body = [row[:-1] + [cell] for row, cell in zip(body, cells)]
        widths[-1] = max([len(heads[-1])] + [len(c) for c in cells])
        if legend:
            notes.append(legend)
    if narrow:
        same = {i for i, col in enumerate(heads) if col in ("strategy", "selector", "fidelity", "epochs")
                and body and len({cells[i] for cells in body}) == 1}
        notes += [f"{heads[i]}: {body[0][i]}" for i in sorted(same)]
        shown = [i for i in shown if heads[i] not in searched and i not in same]
        dropped: list[str] = []
        for col in ("FLOPs x", "params x", "selector", "strategy"):
            # SIMPLE_HEAD: a column takes its width plus 3 (padding and the separator)
            if sum(widths[i] + 3 for i in shown) - 1 <= console.width:
                break
            if col not in heads:
                continue
            if heads.index(col) in shown:
                shown.remove(heads.index(col))
                dropped.append(col)
        dropped += [f"{len(searched)} searched values"] if searched else []
        if dropped:
            notes.append(f"{', '.join(dropped)} not shown at this width (see --format csv)")
    table = Table(title=title, box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD, pad_edge=not narrow)
    for i in shown:
        text = heads[i] in ("strategy", "selector", "ranks", "layers") or heads[i] in searched
        short = narrow and heads[i] in ("layers", "selector", "strategy")  # "3/3" never wraps
        table.add_column(heads[i], overflow="fold", min_width=None if text else widths[i],
                         justify="left" if text else "right", no_wrap=short)
    for cells in body:
        table.add_row(*[cells[i] for i in shown])
    return Group(table, Text("\n".join(_note_lines(notes, console.width)), style="dim italic"))


def _note_lines(notes: list[str], width: int) -> list[str]:
    """The caption's notes joined with "; " into lines of at most ``width``, a note never
    split unless it is longer than a line (then the console wraps it at words)."""
    lines: list[str] = []
    for note in notes:
        if lines and len(lines[-1]) + 2 + len(note) <= width:
            lines[-1] += "; " + note
        else:
            if lines:
                lines[-1] += ";"
            lines.append(note)
    return lines


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
    from rankopt.errors import ConfigError

    counts: dict[str, int] = {}
    try:
        for t in result.study.get_trials(deepcopy=False):
            counts[t.state.name] = counts.get(t.state.name, 0) + 1
    except ConfigError:
        pass
    return counts


def reference_path(run_dir: Path) -> Path:
    from rankopt.results import reference_path as path

    return path(run_dir)


@app.command("pareto")
def pareto_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    format: str = typer.Option("table", "--format", help="table, csv or json."),
    ranks: bool = typer.Option(False, "--ranks", help="Show each layer's decomposer and ranks (default: how many layers)."),
) -> None:
    """The Pareto front: accuracy, params, FLOPs, compression ratios, strategy, searched values."""
    from rankopt.evaluation import cached_accuracies

    from rankopt.cli.empty_run import refuse_empty_run

    _check_format(format, ("table", "csv", "json"))
    result = _open(run_dir)
    refuse_empty_run(result)
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
    from rankopt.cli.empty_run import refuse_empty_run
    from rankopt.report import write_report

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
) -> None:
    """Write one model off the front to a file that rankopt.load_compressed reads."""
    from rankopt.artifacts import read_compressed
    from rankopt.errors import ArtifactError

    from rankopt.cli.empty_run import refuse_empty_run

    result = _open(run_dir)
    refuse_empty_run(result)
    record = result.pick(trial=trial, max_params=max_params, max_flops=max_flops, min_accuracy=min_accuracy)
    source = Path(record.model_path)
    if not source.is_file():
        raise ArtifactError(f"trial {record.trial}'s model file {str(source)!r} is missing")
    _check_out(out, source)
    read_compressed(source)  # refuse to copy a torn or foreign file
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # a reader of --out never sees half a file
    written = None  # (params, flops) of the file when --keep-faster made layers dense
    if keep_faster:
        dense = out.with_name(f".{out.name}.dense.tmp")
        try:
            written = _write_faster(source, dense, result)
            if fold_bn:
                _write_folded(dense, tmp, allow_modules=result.model_modules, folders=result.model_folders)
            else:
                dense.replace(tmp)
        finally:
            dense.unlink(missing_ok=True)
    elif fold_bn:
        _write_folded(source, tmp, allow_modules=result.model_modules, folders=result.model_folders)
    else:
        shutil.copyfile(source, tmp)
    tmp.replace(out)
    if written is not None:  # the file's own figures, after densifying
        ref = result.reference
        console.print(
            f"trial {record.trial}: accuracy {record.accuracy:.4f}, {written[0]:,} params "
            f"({ref['params'] / max(written[0], 1):.2f}x fewer), {written[1]:,} FLOPs with the slower "
            f"layers dense (the trial: {record.params:,} params) -> {out}",
            highlight=False, soft_wrap=True,
        )
    else:
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
    if result.config.data.name is None:  # data passed from Python: its test split is not on disk
        return ("accuracy above is a validation number; the run's data came from Python, so measure "
                f"the test split there: StudyResult({str(result.run_dir)!r}).evaluate({trial}, data=splits)")
    return ("accuracy above is a validation number (what the search optimized): the study has "
            "no test split; set data.test_fraction to hold one out")


def _write_folded(source: Path, out: Path, *, allow_modules: list[str], folders: Any = ()) -> None:
    """``source`` re-written with ``metadata.fold_bn`` after checking the folded model
    equals the unfolded one to 1e-5 on a seeded batch (``load_compressed`` folds)."""
    import torch

    from rankopt.artifacts import read_compressed, save_compressed
    from rankopt.cli.export_cmd import load_compressed_for_cli
    from rankopt.errors import ExportError
    from rankopt.deploy import fold_batchnorm

    payload = read_compressed(source)
    if (payload.get("metadata") or {}).get("fold_bn"):  # folded already
        shutil.copyfile(source, out)
        return
    model = load_compressed_for_cli(source, allow_modules, folders)
    shape = payload.get("input_shape") or []
    if shape:
        x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((fold_batchnorm(model)(x) - model(x)).abs().max())
        if not diff <= 1e-5:
            raise ExportError(f"folding BatchNorm changed the outputs by up to {diff:.3g} (> 1e-5); nothing written")
    metadata = {**(payload.get("metadata") or {}), "fold_bn": True}
    save_compressed(out, model, payload["spec"], base=payload["base"], input_shape=shape or None, metadata=metadata)


def _write_faster(source: Path, out: Path, result: Any) -> tuple[int, int] | None:
    """``source`` re-written with the layers that run slower factorized than dense (in the
    study's ``latency`` runtime and batch) made dense again (``rankopt.densify``)."""
    from rankopt.artifacts import load_compressed, read_compressed, save_compressed
    from rankopt.cli.export_cmd import densify_slower, load_compressed_for_cli

    payload = read_compressed(source)
    if (payload.get("metadata") or {}).get("fold_bn"):
        shutil.copyfile(source, out)  # a folded file's layers are not the spec's any more
        console.print("--keep-faster: the trial's file has BatchNorm folded; written as it is", highlight=False)
        return None
    shape = tuple(payload.get("input_shape") or ())
    if not shape:
        from rankopt.errors import ArtifactError

        raise ArtifactError(f"model file {str(source)!r} records no input shape, so its layers cannot be timed")
    latency = result.config.latency
    model, kept, slower = densify_slower(
        load_compressed_for_cli(source, result.model_modules, result.model_folders), source, payload, shape,
        runtime=latency.runtime, batch=latency.batch, threads=latency.threads, rounds=latency.rounds,
        allow_modules=result.model_modules, done="written dense", module_folders=result.model_folders)
    metadata = {**(payload.get("metadata") or {}), "dense_again": slower}
    save_compressed(out, model, kept, base=payload["base"], input_shape=shape, metadata=metadata)
    load_compressed(out, allow_modules=result.model_modules, module_folders=result.model_folders)  # loads as written
    if not slower:
        return None
    from rankopt.accounting import count

    cost = count(model, shape)
    return cost.params, cost.flops


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
