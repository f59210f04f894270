"""``rankopt evaluate`` (held-out accuracy of saved trials) and ``rankopt dashboard``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from rankopt.cli.app import app, console, err_console

RUN_DIR_HELP = "A run directory written by `rankopt run` (e.g. runs/quickstart)."


@app.command("evaluate")
def evaluate_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    trial: Optional[int] = typer.Option(None, "--trial", help="Evaluate this trial."),
    front: bool = typer.Option(False, "--front", help="Evaluate every Pareto-front trial (the default)."),
    split: str = typer.Option("test", "--split", help="test (held out, the default) or val."),
    format: str = typer.Option("table", "--format", help="table or json."),
    allow_unchecked: bool = typer.Option(
        False, "--allow-unchecked", help="Accept trial files without a checksum or without the study and "
        "trial that wrote them (written by an older rankopt), with a warning.",
    ),
) -> None:
    """Accuracy of saved trial models on the test split the search never saw.

    Each trial's file is checked to be that trial's (study, trial number and spec as the
    storage recorded them) before it is measured; results are cached in evaluation.json
    under the file's SHA-256, so a replaced file is measured again.
    """
    from rankopt.core.errors import ConfigError
    from rankopt.results.evaluation import SPLITS
    from rankopt.results.reading import StudyResult

    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {list(SPLITS)}, got {split!r}")
    if format not in ("table", "json"):
        raise ConfigError(f"--format must be one of ['table', 'json'], got {format!r}")
    if trial is not None and front:
        raise ConfigError("give --trial N or --front, not both")
    from rankopt.cli.empty_run import refuse_empty_run

    result = StudyResult(run_dir)
    refuse_empty_run(result)
    records = {r.trial: r for r in result.trials()}
    numbers = [trial] if trial is not None else [r.trial for r in result.front()]
    if not numbers:
        raise ConfigError(
            f"study {result.config.name!r} has no compressed model on its front yet (every "
            "completed trial left all layers full); give --trial N to evaluate one anyway"
        )
    if trial is not None:
        result.pick(trial=trial)  # a clear error for a trial that is not a completed one
    accuracies = result.evaluate(numbers, split=split, allow_unchecked=allow_unchecked)
    if format == "json":
        typer.echo(json.dumps(
            [{"trial": n, "val_accuracy": records[n].accuracy, f"{split}_accuracy": a}
             for n, a in accuracies.items()], indent=2))
        return
    table = Table(title=f"{result.config.name}: {split} accuracy")
    # --split val measures what the search stored already: one column (measured again)
    heads = ["trial"] + (["val accuracy"] if split != "val" else []) + [f"{split} accuracy", "params", "params x"]
    for col in heads:
        table.add_column(col, justify="right", no_wrap=True)
    for n, acc in accuracies.items():
        r = records[n]
        table.add_row(str(n), *([f"{r.accuracy:.4f}"] if split != "val" else []), f"{acc:.4f}",
                      f"{r.params:,}", f"{r.params_compression:.2f}x")
    console.print(table)


@app.command("dashboard")
def dashboard_command(
    run_dir: Path = typer.Argument(..., help=RUN_DIR_HELP),
    port: int = typer.Option(8080, "--port", help="Local port to serve on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (local only by default; "
                             "see docs/security.md before serving to others)."),
    allow_writes: bool = typer.Option(
        False, "--allow-writes", help="Serve optuna-dashboard's write API too (notes, renaming and deleting "
        "studies). Off by default: the dashboard has no authentication.",
    ),
) -> None:
    """Serve the study with optuna-dashboard: trials, Pareto front, per-trial user attributes.

    Read-only by default (only GET and HEAD reach the storage) and only for requests
    whose Host header names the bound address, so a web page cannot rename or delete
    the study through your browser (see docs/security.md).
    """
    from rankopt.results.dashboard import dashboard_app, is_loopback, serve
    from rankopt.core.errors import ConfigError
    from rankopt.results.reading import StudyResult, storage_url_of

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        raise ConfigError(
            "rankopt dashboard needs optuna-dashboard: pip install 'rankopt[dashboard]'"
        ) from None
    result = StudyResult(run_dir)
    name_objectives(result.study, result.config.objectives)
    url = storage_url_of(result.config, result.run_dir)
    app_ = dashboard_app(url, host=host, port=port, allow_writes=allow_writes)
    if not is_loopback(host):
        err_console.print(
            f"WARNING: --host {host} serves the study to every machine that can reach this one, with no "
            "authentication" + (" and WITH THE WRITE API (--allow-writes): anyone can rename or delete the "
                                "study" if allow_writes else "")
            + "; to share it with a team use an SSH tunnel or a reverse proxy with authentication "
            "(docs/security.md)",
            style="bold red", highlight=False, soft_wrap=True,
        )
    mode = "read-write (--allow-writes)" if allow_writes else "read-only"
    _check_port_free(host, port)
    err_console.print(
        f"serving study {result.config.name!r} at http://{host}:{port}/dashboard/ ({mode}; Ctrl-C stops)",
        highlight=False,
    )
    try:
        serve(app_, host=host, port=port)
    except OSError as exc:  # taken between the check and the bind
        raise ConfigError(_busy(host, port, exc)) from None


def _busy(host: str, port: int, exc: OSError) -> str:
    return (f"--port {port}: cannot serve on {host}:{port} ({exc.strerror or exc}); another "
            "program uses it: give a free port, e.g. --port 8081")


def _check_port_free(host: str, port: int) -> None:
    """Bind the port once before serving, so a busy port is one line (exit 2), not the web
    server's traceback after "serving..."."""
    import socket

    from rankopt.core.errors import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"--host: cannot resolve {host!r} ({exc})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(_busy(host, port, exc)) from None


def name_objectives(study: Any, objectives: list[str]) -> None:
    """Name the objectives in the storage so the dashboard labels axes accuracy/params/..."""
    import warnings

    if study.metric_names != list(objectives):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            study.set_metric_names(list(objectives))
