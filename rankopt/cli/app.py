"""The typer application that every command module adds its commands to."""

from __future__ import annotations

import typer
from rich.console import Console

__all__ = ["app", "console", "err_console", "state"]

app = typer.Typer(
    name="rankopt",
    help="Compress CNNs with low-rank decompositions and search for the best ranks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
state: dict[str, bool] = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state["debug"] = debug
