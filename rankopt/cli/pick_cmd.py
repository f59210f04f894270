"""``rankopt pick``: one model off the front, checked to be its trial's, to a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from rankopt.cli.app import app, console
from rankopt.cli.study_cmds import RUN_DIR_HELP, _open


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
    force: bool = typer.Option(
        False, "--force", help="Write --out even among a run directory's own files (trials/, reference/, "
        "cache/); a study's storage (optuna.db) is never overwritten.",
    ),
) -> None:
    """Write one model off the front to a file that rankopt.load_compressed reads.

    The trial's file is checked to be that trial's (study, trial number and spec as the
    storage recorded them) and loaded before anything is written.
    """
    from rankopt.core.errors import ArtifactError
    from rankopt.cli.empty_run import refuse_empty_run
    from rankopt.deploy.picking import LatencySettings, check_builds, write_picked

    result = _open(run_dir)
    refuse_empty_run(result)
    record = result.pick(trial=trial, max_params=max_params, max_flops=max_flops, min_accuracy=min_accuracy)
    source = Path(result.local_model(record).model_path)
    if not source.is_file():
        raise ArtifactError(f"trial {record.trial}'s model file {str(source)!r} is missing")
    # refuse to copy a torn, foreign or swapped file; and it must load
    check_builds(result.trial_payload(record, allow_unchecked=allow_unchecked), source,
                 allow_modules=result.model_modules, module_folders=result.model_folders)
    if fold_bn or keep_faster:  # both rebuild the model from the file
        from rankopt.cli.export_cmd import python_model_refusal

        refusal = python_model_refusal(result.reference, source)
        if refusal is not None:
            raise refusal
    latency = result.config.latency
    picked = write_picked(
        source, out, fold_bn=fold_bn, allow_modules=result.model_modules, allow_unchecked=allow_unchecked,
        force=force,
        module_folders=result.model_folders,
        keep_faster=LatencySettings(latency.runtime, latency.batch, latency.threads, latency.rounds)
        if keep_faster else None,
    )
    for line in picked.notes:
        console.print(line, highlight=False, soft_wrap=True)
    if picked.params is not None:  # the file's own figures, after densifying
        ref = result.reference
        console.print(
            f"trial {record.trial}: accuracy {record.accuracy:.4f}, {picked.params:,} params "
            f"({ref['params'] / max(picked.params, 1):.2f}x fewer), {picked.flops:,} FLOPs with the slower "
            f"layers dense (the trial: {record.params:,} params) -> {out}",
            highlight=False, soft_wrap=True,
        )
    else:
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


