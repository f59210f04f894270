"""The ``rankopt`` command line.

Exit status: 0 on success, 2 on a usage or configuration error (one line, no
traceback unless ``--debug``), 1 on a failure during work.
"""

from __future__ import annotations

import importlib
import sys

import click
import typer

# recent typer vendors its own click: catch both its and click's exception classes
_EXIT: tuple[type[BaseException], ...] = (click.exceptions.Exit, typer.Exit)
_ABORT: tuple[type[BaseException], ...] = (click.exceptions.Abort, typer.Abort)
_USAGE: tuple[type[BaseException], ...] = (click.exceptions.ClickException,)
try:
    from typer._click.exceptions import ClickException as _TyperClickException

    _USAGE += (_TyperClickException,)
except ImportError:  # pragma: no cover - typer that uses click itself
    pass

from rankopt.cli.app import app, err_console, state

__all__ = ["app", "main"]

# each module adds its commands to `app`
COMMAND_MODULES: tuple[str, ...] = (
    "rankopt.cli.study_cmds",
    "rankopt.cli.pick_cmd",
    "rankopt.cli.plugins_cmd",
    "rankopt.cli.inspect_layers_cmd",
    "rankopt.cli.export_cmd",
    "rankopt.cli.user_cmds",
)

for _mod in COMMAND_MODULES:
    importlib.import_module(_mod)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; map rankopt errors to exit codes without tracebacks."""
    from rankopt.core.errors import ConfigError, RankoptError, StudyInterrupted

    args = list(sys.argv[1:] if argv is None else argv)
    state["debug"] = "--debug" in args
    try:
        # without standalone mode click *returns* typer.Exit's code instead of raising it
        code = app(args=args, standalone_mode=False, prog_name="rankopt")
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    except _EXIT as exc:  # typer.Exit
        return int(exc.exit_code or 0)
    except _ABORT:
        err_console.print("Aborted.")
        return 130
    except _USAGE as exc:  # usage errors from the CLI library itself
        # one line like every other usage error (click's own form spans three)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = " ".join(exc.format_message().split())
        given = _given_value(args, getattr(exc, "param", None))
        if given is not None and repr(given) not in message:
            message += f"; got {given!r}"
        err_console.print(f"error: {message}{hint}", highlight=False, soft_wrap=True, markup=False)
        return int(getattr(exc, "exit_code", 2) or 2)
    except StudyInterrupted as exc:  # Ctrl-C during `rankopt run`: completed trials are kept
        err_console.print(str(exc), highlight=False, soft_wrap=True, markup=False)
        return 130
    except ConfigError as exc:
        if state["debug"]:
            raise
        err_console.print(f"error: {exc}", highlight=False, soft_wrap=True, markup=False)
        return 2
    except RankoptError as exc:
        if state["debug"]:
            raise
        err_console.print(f"error: {type(exc).__name__}: {exc}", highlight=False, soft_wrap=True, markup=False)
        return 1
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        return 130
    except OSError as exc:  # the file system said no (read-only, full, gone): one line
        if state["debug"]:
            raise
        from rankopt.core.safe_paths import describe_os_error

        err_console.print(f"error: {describe_os_error(exc)}", highlight=False, soft_wrap=True, markup=False)
        return 1
    return 0


def _given_value(args: list[str], param: object) -> str | None:
    """The text given for an option on the command line (click's messages omit it)."""
    for opt in getattr(param, "opts", None) or ():
        for i, arg in enumerate(args):
            if arg == opt and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(opt + "="):
                return arg[len(opt) + 1:]
    return None


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _entry()
