"""The typer application that every command module adds its commands to."""

from __future__ import annotations

import sys

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
# piped or redirected output is not wrapped at 80 columns (a file has no width)
console = Console() if sys.stdout.isatty() else Console(width=240, soft_wrap=True)
err_console = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=240, soft_wrap=True)
state: dict[str, bool] = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state["debug"] = debug
