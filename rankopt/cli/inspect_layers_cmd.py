"""``rankopt inspect``: print :func:`rankopt.inspect_layers` as a table, csv or json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from rankopt.cli.app import app, console, err_console

FORMATS = ("table", "csv", "json")


def _parse_floats(text: str, what: str) -> list[float]:
    from rankopt.core.errors import ConfigError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers like 0.92,0.95,0.98, got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise ConfigError(f"{what} must be numbers in (0, 1] like 0.92,0.95,0.98, got {text!r}")
    return values


def _parse_shape(text: str) -> tuple[int, ...]:
    from rankopt.core.errors import ConfigError

    try:
        shape = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ConfigError(
            f"--input-shape must be positive integers separated by commas, batch first "
            f"(e.g. 1,3,32,32), got {text!r}"
        )
    from rankopt.core.limits import check_input_shape

    check_input_shape(shape, "--input-shape")
    return shape


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _print_table(table_: Any) -> None:
    """The NRMF layer-table layout: a row per layer, then a row per method under it."""
    methods: Sequence[str] = table_.methods
    table = Table(title=f"{table_.label}: {table_.decomposer} ranks per layer (input {list(table_.input_shape)})")
    table.add_column("layer", overflow="fold")
    for col in ("S", "T", "kernel", "ranks", "params", "ratio"):
        table.add_column(col, justify="right")
    notes: list[str] = []
    for r in table_.layers:
        table.add_row(
            r["layer"], str(r["S"]), str(r["T"]), "x".join(str(k) for k in r["kernel"]), "", _si(r["params"]), "",
        )
        for m in methods:
            e = r["methods"].get(m)
            if e is None:
                continue
            ratio = f"x{e['ratio']:.2f}" if e["compressed"] and not r.get("dense") else f"x{e['ratio']:.2f} kept full"
            table.add_row(
                f"  {m.replace('energy@', 'p=')}", "", "", "", "/".join(str(x) for x in e["ranks"]),
                _si(e["params"]), ratio,
            )
        if "note" in r:  # as a footnote under the table: a long note would fold the layer column
            notes.append(f"{r['layer']}: {r['note']}")
            table.add_row(f"  (note {len(notes)})", "", "", "", "", "", "")
        table.add_section()
    table.add_row("model", "", "", "", "", _si(table_.total["params"]), "")
    for m in methods:
        t = table_.total["methods"][m]
        table.add_row(f"  {m.replace('energy@', 'p=')}", "", "", "", "", _si(t["params"]), f"x{t['ratio']:.2f}")
    console.print(table)
    for i, note in enumerate(notes, 1):
        console.print(f"note {i}: {note}", highlight=False)


@app.command("inspect")
def inspect_command(
    model_or_study: str = typer.Argument(
        ..., help="A registered model name (see `rankopt plugins`), package.module:callable, or a study file."
    ),
    weights: Optional[Path] = typer.Option(None, "--weights", help="A state_dict file (loaded with weights_only=True)."),
    input_shape: Optional[str] = typer.Option(
        None, "--input-shape", help="Input shape with batch, e.g. 1,3,32,32 (default: the model's own)."
    ),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Number of classes of the model."),
    format: str = typer.Option("table", "--format", help="Output format: table, csv or json."),
    decomposer: str = typer.Option("tucker2", "--decomposer", help="The decomposer whose ranks and costs are shown."),
    thresholds: str = typer.Option("0.92,0.95,0.98", "--thresholds", help="Energy thresholds p, comma-separated."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="A spectral-cache directory to read and fill (default: memory only)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the model's initialization (without --weights)."),
    min_in_channels: Optional[int] = typer.Option(
        None, "--min-in-channels",
        help="Layers with fewer input channels are kept dense (default: the study file's "
        "targets.dense_input_channels + 1, else 4 as in a study).",
    ),
    min_saving: Optional[float] = typer.Option(
        None, "--min-saving",
        help="Ranks saving less than this share of a layer's params or FLOPs leave it dense "
        "(default: the study file's targets.min_saving, else 0.1 as in a study).",
    ),
) -> None:
    """Show each layer's shape, EVBMF and energy-threshold ranks, and their compression."""
    from rankopt.core.errors import ConfigError
    from rankopt.results.layer_table import inspect_layers

    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {list(FORMATS)}, got {format!r}")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"--num-classes must be a positive integer, got {num_classes}")
    if min_in_channels is not None and min_in_channels < 1:
        raise ConfigError(f"--min-in-channels must be an integer >= 1, got {min_in_channels}")
    if min_saving is not None and not 0 <= min_saving < 1:
        raise ConfigError(f"--min-saving must be a number in [0, 1), got {min_saving}")
    table = inspect_layers(
        model_or_study, weights=weights, input_shape=_parse_shape(input_shape) if input_shape is not None else None,
        num_classes=num_classes, decomposer=decomposer, thresholds=_parse_floats(thresholds, "--thresholds"),
        cache_dir=cache_dir, seed=seed, min_in_channels=min_in_channels, min_saving=min_saving,
    )
    if format == "json":  # json says it in "trained"; csv stays a plain table
        typer.echo(json.dumps(table.as_dict(), indent=2))
    elif format == "csv":
        typer.echo(table.to_csv(), nl=False)
    else:
        if not table.trained:
            err_console.print(
                f"warning: {table.label} has untrained (randomly initialized) weights, whose spectra are "
                "nearly flat: VBMF and energy ranks say little about a trained model; give "
                "--weights, a study file with reference.weights, or a run directory",
                highlight=False,
            )
        _print_table(table)
        if table.census is not None:
            console.print(f"layers ({', '.join(table.census.decomposers)}): {table.census.summary()}",
                          highlight=False)
