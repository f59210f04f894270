"""The typer application that every command module adds its commands to."""

from __future__ import annotations

import os
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


def _console(stderr: bool = False) -> Console:
    """A terminal's own width; piped or redirected output is not wrapped at 80 columns (a
    file has no width) but at ``COLUMNS`` when the user sets it, else 240."""
    if (sys.stderr if stderr else sys.stdout).isatty() or os.environ.get("COLUMNS", "").isdigit():
        return Console(stderr=stderr)  # rich reads COLUMNS itself
    return Console(stderr=stderr, width=240, soft_wrap=True)


console = _console()
err_console = _console(stderr=True)
state: dict[str, bool] = {"debug": False}


def _flags_without_type() -> None:
    """typer's rich help prints ``<bool>`` after on/off flags (``--quiet <bool>``), as if they
    took a value; a flag takes none, so show no type for it."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - a typer without its own option class
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_rankopt", False):
        return

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    display_type_rich._rankopt = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_type()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            text = version("rankopt")
        except PackageNotFoundError:  # run from a source tree that is not installed
            text = "unknown (not installed)"
        typer.echo(f"rankopt {text}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print rankopt's version and exit."),
) -> None:
    state["debug"] = debug
