"""``rankopt export``: a trial of a run, or a picked model file, to ONNX or TorchScript."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from rankopt.cli.app import app, console


def _real_inputs(run_dir: Path, batch: int) -> Any:
    """The first ``batch`` validation images of the run's dataset (None without one)."""
    import torch

    from rankopt.contract.manager import get_registry
    from rankopt.results.reading import StudyResult

    config = StudyResult(run_dir).config
    if config.data.name is None:  # a study given its data in Python
        return None
    splits = get_registry().create("datasets", config.data.name, **config.data.kwargs)
    n = min(batch, len(splits.val))  # type: ignore[arg-type]
    return torch.stack([torch.as_tensor(splits.val[i][0]).float() for i in range(n)])


def densify_slower(model: Any, model_file: Path, payload: Any, input_shape: tuple[int, ...], *, runtime: str,
                   batch: int, threads: int = 1, rounds: int = 15, allow_modules: Any = (),
                   done: str = "made dense again", module_folders: Any = ()) -> tuple[Any, dict[str, Any], list[str]]:
    """``model`` (loaded from ``model_file``) with the layers that run slower factorized
    than dense in ``runtime`` made dense again, the spec it keeps, and those layers; each
    layer's reason and a summary line are printed (``export`` and ``pick --keep-faster``)."""
    from rankopt.deploy.artifacts import load_base
    from rankopt.deploy.exporting import densify
    from rankopt.compression.latency import keep_faster_layers
    from rankopt.compression.surgery import find_layers

    base = load_base(model_file, allow_modules=allow_modules, module_folders=module_folders)
    spec = payload["spec"]
    kept, slower = keep_faster_layers(base, spec, find_layers(base, input_shape), batch=batch, runtime=runtime,
                                      threads=threads, repeats=rounds)
    for name, why in slower.items():
        console.print(f"{name}: {why}", highlight=False, soft_wrap=True)
    console.print(f"--keep-faster: {len(slower)} of {len(spec)} decomposed layers {done} "
                  f"(timed in {runtime} at batch {batch})", highlight=False, soft_wrap=True)
    return (densify(model, base, slower) if slower else model), kept, sorted(slower)


def python_model_refusal(payload: Any, model_file: Path) -> Exception | None:
    """The CLI's words for a file compressed from a module passed from Python (the CLI
    cannot rebuild it), or None for a file it can rebuild."""
    from rankopt.core.errors import ConfigError

    base = payload.get("base") or {}
    if not base.get("class"):
        return None
    name = str(base["class"]).rpartition(".")[2]
    return ConfigError(
        f"{str(model_file)!r} was compressed from a module passed from Python ({name}); the CLI "
        f"cannot rebuild it: in Python, rankopt.load_compressed(path, model={name}(...)) "
        "then rankopt.export(model, 'model.onnx', input_shape=...)"
    )


def build_for_cli(payload: Any, model_file: Path, allow_modules: list[str], module_folders: Any = ()) -> Any:
    """``build_compressed``, or :func:`python_model_refusal` where the CLI cannot rebuild it."""
    from rankopt.deploy.artifacts import build_compressed
    from rankopt.core.errors import ArtifactError

    try:
        return build_compressed(payload, model_file, allow_modules=allow_modules, module_folders=module_folders)
    except ArtifactError as exc:
        refusal = python_model_refusal(payload, model_file)
        if refusal is None:
            raise
        raise refusal from exc


@app.command("export")
def export_command(
    source: Path = typer.Argument(..., help="A run directory (with --trial) or a model file written by `rankopt pick`."),
    out: Path = typer.Option(..., "--out", help="The file to write, e.g. model.onnx."),
    format: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    trial: Optional[int] = typer.Option(None, "--trial", help="The trial to export (SOURCE a run directory)."),
    data: Optional[Path] = typer.Option(
        None, "--data", help="A run directory whose validation images verify a picked file (default: SOURCE's, when a run)."
    ),
    batch: int = typer.Option(32, "--batch", help="How many inputs the exported file is verified on."),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="The absolute part of the accepted output difference."),
    rtol: float = typer.Option(1e-4, "--rtol", help="The relative part: accepted up to tolerance + rtol * max|output|."),
    fold_bn: bool = typer.Option(True, "--fold-bn/--no-fold-bn", help="Fold BatchNorm into the preceding conv first."),
    keep_faster: bool = typer.Option(
        False, "--keep-faster", help="Time every decomposed layer against the dense layer it computes in the "
        "serving runtime (ONNX Runtime for onnx, TorchScript for torchscript; 1 thread, interleaved CPU "
        "time) and ship the dense one where the factorized form is slower: the same function, more params.",
    ),
    latency_batch: int = typer.Option(1, "--latency-batch", help="The batch --keep-faster times at."),
    allow_unchecked: bool = typer.Option(
        False, "--allow-unchecked", help="Load a model file that carries no checksum (written by an older "
        "rankopt), with a warning; without it such a file is refused.",
    ),
    allow_module: list[str] = typer.Option(
        [], "--allow-module", help="Let a picked file rebuild its model from this module (a "
        "`module:factory` model; a run directory trusts the module its study named). Repeatable.",
    ),
    force: bool = typer.Option(
        False, "--force", help="Write --out even among a run directory's own files (trials/, reference/, "
        "cache/); a study's storage (optuna.db) is never overwritten.",
    ),
) -> None:
    """Write a compressed model as ONNX (dynamic batch) or TorchScript, verified against PyTorch.

    The file is run in ONNX Runtime (or TorchScript) on real validation images and the
    largest absolute difference from PyTorch printed; above --tolerance nothing is
    written and the exit status is 1.
    """
    from rankopt.deploy.artifacts import read_compressed
    from rankopt.core.errors import ConfigError
    from rankopt.deploy.exporting import EXPORT_FORMATS, export
    from rankopt.results.reading import StudyResult

    if format not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be one of {list(EXPORT_FORMATS)}, got {format!r}")
    if batch < 1:
        raise ConfigError(f"--batch must be a positive integer, got {batch}")
    if not tolerance > 0:
        raise ConfigError(f"--tolerance must be a positive number, got {tolerance}")
    if latency_batch < 1:
        raise ConfigError(f"--latency-batch must be a positive integer, got {latency_batch}")
    import os

    allowed = list(allow_module)
    folders: list[Any] = [os.getcwd()]  # an allowed module beside where the command runs
    from rankopt.core.safe_paths import check_output

    check_output(out, force=force)  # never a run's own files; never a storage
    if source.is_dir():
        if trial is None:
            raise ConfigError(f"{str(source)!r} is a run directory: say which trial with --trial N (see `rankopt pareto`)")
        run = StudyResult(source)
        record = run.pick(trial=trial)
        payload = run.trial_payload(record, allow_unchecked=allow_unchecked)  # trial N's file, or refused
        model_file = Path(run.local_model(record).model_path)
        allowed += run.model_modules  # the run's own study named (and imported) it
        folders = run.model_folders + folders
        data = data or source
    elif source.is_file():
        if trial is not None:
            raise ConfigError(f"--trial is for a run directory; {str(source)!r} is a model file")
        model_file = source
        payload = None
    else:
        raise ConfigError(f"{str(source)!r} is neither a run directory nor a model file written by `rankopt pick`")
    if data is not None and not data.is_dir():
        raise ConfigError(f"--data must be a run directory written by `rankopt run`, got {str(data)!r}")
    if payload is None:
        payload = read_compressed(model_file, allow_unchecked=allow_unchecked)
    input_shape = payload.get("input_shape")
    if not input_shape:
        raise ConfigError(f"model file {str(model_file)!r} records no input shape; use rankopt.export(..., input_shape=...)")
    model = build_for_cli(payload, model_file, allowed, folders)
    if keep_faster:
        if (payload.get("metadata") or {}).get("fold_bn"):
            raise ConfigError(
                f"--keep-faster needs the layers as rankopt built them; {str(model_file)!r} was written "
                "with `pick --fold-bn`: pick it again without --fold-bn (export folds BatchNorm itself)"
            )
        from rankopt.deploy.keep_faster import densify_slower

        done = densify_slower(model, model_file, payload, tuple(input_shape), batch=latency_batch,
                              runtime="onnxruntime" if format == "onnx" else "torchscript",
                              allow_modules=allowed, module_folders=folders, allow_unchecked=allow_unchecked)
        for line in done.lines():
            console.print(line, highlight=False, soft_wrap=True)
        model = done.model
    inputs = _real_inputs(data, batch) if data is not None else None
    result = export(
        model, out, format, input_shape=tuple(input_shape), inputs=inputs, fold_bn=fold_bn, tolerance=tolerance,
        rtol=rtol,
    )
    what = "validation images" if inputs is not None else "seeded random inputs (give --data RUN_DIR for real ones)"
    console.print(
        f"wrote {result.path} ({format}, dynamic batch); largest |difference| from PyTorch on "
        f"{result.batch} {what}: {result.max_abs_diff:.3g} ({result.max_rel_diff:.3g} of the largest "
        f"output; accepted up to {tolerance:g} + {rtol:g} x the largest output)",
        highlight=False,
        soft_wrap=True,
    )
