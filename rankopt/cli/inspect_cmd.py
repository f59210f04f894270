"""`rankopt inspect`: the per-layer rank table of a model (the NRMF layer table).

For every Conv2d/Linear layer: S, T, kernel, parameters, and for EVBMF and the energy
threshold at p = 0.92, 0.95, 0.98 the selected ranks, the decomposer's exact parameter
count at those ranks and the compression ratio. A layer whose factorized form would
not be smaller is marked as kept full (that is what a study would do with it).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from rankopt.cli.app import app, console

FORMATS = ("table", "csv", "json")
STUDY_SUFFIXES = (".yaml", ".yml")
DEFAULT_SAMPLE_SHAPE = (3, 32, 32)


def _parse_floats(text: str, what: str) -> list[float]:
    from rankopt.errors import ConfigError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers like 0.92,0.95,0.98, got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise ConfigError(f"{what} must be numbers in (0, 1] like 0.92,0.95,0.98, got {text!r}")
    return values


def check_size_on_meta(factory: Any, kwargs: Any, where: str) -> None:
    from rankopt.limits import check_size_on_meta as check

    check(factory, kwargs, where)


def _parse_shape(text: str) -> tuple[int, ...]:
    from rankopt.errors import ConfigError

    try:
        shape = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise ConfigError(
            f"--input-shape must be positive integers separated by commas, batch first "
            f"(e.g. 1,3,32,32), got {text!r}"
        )
    from rankopt.limits import check_input_shape

    check_input_shape(shape, "--input-shape")
    return shape


def _accepts(factory: Any, key: str) -> bool:
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD for p in params) or key in {p.name for p in params}


def load_model(
    source: str,
    *,
    weights: Path | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[Any, tuple[int, ...], str]:
    """(model, input shape with batch, label) for a registered name, a
    ``package.module:callable`` or a study file.

    The model is built with torch's RNG seeded by ``seed`` (the caller's RNG state is
    restored), so a randomly initialized model is the same on every call and its
    spectra are found in a disk cache.
    """
    import torch

    from rankopt.errors import ConfigError
    from rankopt.manager import get_registry

    kwargs: dict[str, Any] = {}
    sample_shape: tuple[int, ...] | None = None
    label = source
    if source.endswith(STUDY_SUFFIXES):
        from rankopt.config import load_config

        config = load_config(source, check_paths=False)
        if config.model is None:
            raise ConfigError(
                f"study file {source!r} names no model (model.name); `rankopt inspect` needs one"
            )
        name, kwargs = config.model.name, dict(config.model.kwargs)
        if weights is None and config.reference.weights:
            weights = Path(config.reference.weights)
        label = f"{name} (from {source})"
    else:
        name = source
    if ":" in name:
        from rankopt.config import import_model_factory

        factory = import_model_factory(name, "MODEL_OR_STUDY")
    else:
        record = get_registry().record("models", name)
        factory = record.factory
        sample_shape = getattr(record, "input_shape", None)
        kwargs = {**dict(getattr(record, "defaults", {}) or {}), **kwargs}
    if num_classes is not None:
        if not _accepts(factory, "num_classes"):
            raise ConfigError(f"--num-classes: model {name!r} takes no num_classes argument")
        kwargs["num_classes"] = num_classes
    check_size_on_meta(factory, kwargs, "model kwargs")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(**kwargs)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{name!r} returned {type(model).__name__}, not an nn.Module")
    if weights is not None:
        if not Path(weights).is_file():
            raise ConfigError(f"--weights: file {str(weights)!r} does not exist")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(
                f"--weights: {str(weights)!r} is not a state_dict file loadable with "
                f"weights_only=True ({type(exc).__name__}: {exc})"
            ) from None
        if not isinstance(state, Mapping):
            raise ConfigError(f"--weights: {str(weights)!r} holds a {type(state).__name__}, not a state_dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"--weights: {str(weights)!r} does not fit model {name!r}: {exc}") from None
    if input_shape is None:
        input_shape = (1, *(sample_shape or DEFAULT_SAMPLE_SHAPE))
    return model.eval(), tuple(input_shape), label


def inspect_rows(
    model: Any,
    input_shape: Sequence[int],
    *,
    decomposer: str = "tucker2",
    thresholds: Sequence[float] = (0.92, 0.95, 0.98),
    cache: Any = None,
    min_in_channels: int = 4,
    min_saving: float = 0.1,
) -> tuple[list[str], list[dict[str, Any]]]:
    """(method names, one row per compressible layer) of the inspect table.

    A layer with fewer than ``min_in_channels`` input channels (a study's default 4)
    gets ``dense: true`` and a note saying why a study leaves it full; its ranks are
    still shown, and the model totals leave it uncompressed. A method's ranks that save
    less than ``min_saving`` (a study's ``targets.min_saving``, default 0.1) are
    ``compressed: false`` with the ``reason``.
    """
    import rankopt
    from rankopt.selection import cost_increase_reason, layer_costs

    dec = rankopt.decomposer(decomposer)
    methods: list[tuple[str, Any, dict[str, Any]]] = [("vbmf", rankopt.rank_selector("vbmf"), {})]
    energy = rankopt.rank_selector("energy")
    methods += [(f"energy@{p:g}", energy, {"p": p}) for p in thresholds]
    rows = []
    for layer in rankopt.find_layers(model, tuple(input_shape)):
        module = model.get_submodule(layer.name)
        row: dict[str, Any] = {
            "layer": layer.name,
            "kind": layer.kind,
            "S": layer.in_channels,
            "T": layer.out_channels,
            "kernel": list(layer.kernel_size),
            "params": layer.cost.params,
            "flops": layer.cost.flops,
            "methods": {},
        }
        why = dec.unsupported_reason(module)
        if layer.in_channels < min_in_channels:
            row["dense"] = True
            row["note"] = (
                f"kept dense by studies: {layer.in_channels} input channel(s) < min_in_channels "
                f"{min_in_channels}; a stem this thin saves almost nothing and costs an extra op"
            )
        if why is not None:
            row["note"] = f"{decomposer}: {why}"
        else:
            options = dec.default_options(module)
            for label, selector, params in methods:
                ranks = selector.select(module, dec, cache=cache, name=layer.name, options=options, **params)
                new, original, flops_known = layer_costs(dec, module, ranks, layer.input_hw, options)
                reason = cost_increase_reason(dec.name, ranks, new, original, flops_known, min_saving)
                row["methods"][label] = {
                    "ranks": list(ranks),
                    "params": new.params,
                    "flops": new.flops,
                    "ratio": original.params / new.params if new.params else float("inf"),
                    "compressed": reason is None,
                    **({"reason": reason} if reason is not None else {}),
                }
        rows.append(row)
    return [m[0] for m in methods], rows


def _totals(model: Any, methods: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"params": total, "methods": {}}
    for m in methods:
        saved = sum(
            r["params"] - r["methods"][m]["params"]
            for r in rows
            if m in r["methods"] and r["methods"][m]["compressed"] and not r.get("dense")
        )
        out["methods"][m] = {"params": total - saved, "ratio": total / max(total - saved, 1)}
    return out


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _print_table(label: str, shape: Sequence[int], decomposer: str, methods: Sequence[str],
                 rows: Sequence[Mapping[str, Any]], totals: Mapping[str, Any]) -> None:
    """The NRMF layer-table layout: a row per layer, then a row per method under it."""
    table = Table(title=f"{label}: {decomposer} ranks per layer (input {list(shape)})")
    table.add_column("layer", overflow="fold")
    for col in ("S", "T", "kernel", "ranks", "params", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
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
        if "note" in r:
            table.add_row(f"  ({r['note']})", "", "", "", "", "", "")
        table.add_section()
    table.add_row("model", "", "", "", "", _si(totals["params"]), "")
    for m in methods:
        t = totals["methods"][m]
        table.add_row(f"  {m.replace('energy@', 'p=')}", "", "", "", "", _si(t["params"]), f"x{t['ratio']:.2f}")
    console.print(table)


def _csv(methods: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["layer", "kind", "S", "T", "kernel", "params", "flops"]
    for m in methods:
        header += [f"{m}_ranks", f"{m}_params", f"{m}_flops", f"{m}_ratio", f"{m}_compressed"]
    writer.writerow(header)
    for r in rows:
        line = [r["layer"], r["kind"], r["S"], r["T"], "x".join(str(k) for k in r["kernel"]), r["params"], r["flops"]]
        for m in methods:
            e = r["methods"].get(m)
            line += (
                ["/".join(str(x) for x in e["ranks"]), e["params"], e["flops"], f"{e['ratio']:.4f}", e["compressed"]]
                if e else ["", "", "", "", ""]
            )
        writer.writerow(line)
    return buf.getvalue()


def _study_weights(source: str) -> bool:
    """Whether a study file names reference weights (then inspect loads them)."""
    if not source.endswith(STUDY_SUFFIXES):
        return False
    from rankopt.config import load_config

    return bool(load_config(source, check_paths=False).reference.weights)


def load_run_reference(
    run_dir: Path, *, weights: Path | None = None, input_shape: Sequence[int] | None = None
) -> tuple[Any, tuple[int, ...], str]:
    """The reference model of a run directory, with its trained weights
    (``reference/model.pt``) and input shape (``reference/metrics.json``)."""
    import torch

    from rankopt.artifacts import _build_base
    from rankopt.errors import ArtifactError, ConfigError
    from rankopt.results import reference_path

    metrics_file = reference_path(run_dir)
    weights_file = weights or run_dir / "reference" / "model.pt"
    if not metrics_file.is_file() or not Path(weights_file).is_file():
        raise ConfigError(
            f"{str(run_dir)!r} is not a run directory with a trained reference (no "
            "reference/metrics.json and reference/model.pt); give a run directory that "
            "`rankopt run` wrote, a model name or a study file"
        )
    metrics = json.loads(metrics_file.read_text())
    base = metrics.get("base", {})
    if base.get("class"):
        raise ConfigError(
            f"run {str(run_dir)!r} was run on a module passed from Python ({base['class']}), "
            "which inspect cannot rebuild; from Python: inspect_rows(model, input_shape)"
        )
    from rankopt.results import StudyResult

    try:  # the run's own study file was trusted to import its factory; nothing else is
        factory, kwargs, _ = _build_base(base, metrics_file, StudyResult(run_dir).model_modules)
        check_size_on_meta(factory, kwargs, f"{str(metrics_file)!r}: base.kwargs")
        model = factory(**kwargs)
    except ArtifactError as exc:
        raise ConfigError(str(exc)) from None
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    shape = tuple(input_shape or metrics.get("input_shape") or (1, *DEFAULT_SAMPLE_SHAPE))
    name = base.get("model") or base.get("callable")
    return model.eval(), shape, f"{name} (reference of {run_dir})"


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
    from rankopt.errors import ConfigError
    from rankopt.spectral import SpectralCache, get_default_cache

    if format not in FORMATS:
        raise ConfigError(f"--format must be one of {list(FORMATS)}, got {format!r}")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"--num-classes must be a positive integer, got {num_classes}")
    ps = _parse_floats(thresholds, "--thresholds")
    shape = _parse_shape(input_shape) if input_shape is not None else None
    if model_or_study.endswith(STUDY_SUFFIXES) and (min_in_channels is None or min_saving is None):
        from rankopt.config import load_config

        study_targets = load_config(model_or_study, check_paths=False).targets
        if min_in_channels is None:
            min_in_channels = study_targets.dense_input_channels + 1
        if min_saving is None:
            min_saving = study_targets.min_saving
    if min_saving is None:
        from rankopt.config_sections import TargetsConfig

        min_saving = TargetsConfig().min_saving  # a study's default
    min_in_channels = 4 if min_in_channels is None else min_in_channels
    if min_in_channels < 1:
        raise ConfigError(f"--min-in-channels must be an integer >= 1, got {min_in_channels}")
    if not 0 <= min_saving < 1:
        raise ConfigError(f"--min-saving must be a number in [0, 1), got {min_saving}")
    import rankopt

    rankopt.decomposer(decomposer)  # an unknown name fails before any work
    if Path(model_or_study).is_dir():
        model, shape, label = load_run_reference(Path(model_or_study), weights=weights, input_shape=shape)
        trained = True
    else:
        model, shape, label = load_model(
            model_or_study, weights=weights, num_classes=num_classes, input_shape=shape, seed=seed
        )
        trained = weights is not None or _study_weights(model_or_study)
    if not trained and format == "table":  # json says it in "trained"; csv stays a plain table
        from rankopt.cli.app import err_console

        err_console.print(
            f"warning: {label} has untrained (randomly initialized) weights, whose spectra are "
            "nearly flat: VBMF and energy ranks say little about a trained model; give "
            "--weights, a study file with reference.weights, or a run directory",
            highlight=False,
        )
    cache = SpectralCache(cache_dir) if cache_dir is not None else get_default_cache()
    methods, rows = inspect_rows(
        model, shape, decomposer=decomposer, thresholds=ps, cache=cache, min_in_channels=min_in_channels,
        min_saving=min_saving,
    )
    totals = _totals(model, methods, rows)
    if format == "json":
        out = {
            "model": label, "trained": trained, "input_shape": list(shape), "decomposer": decomposer,
            "methods": methods, "layers": rows, "total": totals,
        }
        typer.echo(json.dumps(out, indent=2))
    elif format == "csv":
        typer.echo(_csv(methods, rows), nl=False)
    else:
        _print_table(label, shape, decomposer, methods, rows, totals)
