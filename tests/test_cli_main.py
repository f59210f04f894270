"""`rankopt.cli.main`: exit codes and one-line errors for the CLI library's own usage errors."""

from __future__ import annotations

import pytest

from rankopt.cli import main


@pytest.mark.parametrize(
    "argv",
    [
        ["no-such-command"],
        ["pick", "runs/x", "--max-params", "abc", "--out", "x.pt"],
        ["plugins", "--no-such-option"],
    ],
)
def test_usage_errors_of_the_cli_library_exit_2_without_traceback(argv, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error" in err.lower() and err.count("\n") == 1  # one line


def test_help_exits_0(capsys) -> None:
    assert main(["--help"]) == 0
    assert "pareto" in capsys.readouterr().out


@pytest.mark.parametrize("columns, widest", [(None, (81, 240)), ("70", (60, 70))])
def test_piped_output_wraps_at_columns_when_set_else_stays_wide(columns, widest) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    out = subprocess.run([sys.executable, "-m", "rankopt", "plugins"], capture_output=True, text=True,
                         env=env, check=True).stdout
    width = max(len(line) for line in out.splitlines())
    assert widest[0] <= width <= widest[1], (columns, width)
