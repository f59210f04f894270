"""Append a benchmark's table to ``benchmarks/RESULTS.md`` with the date, the machine and the command."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table of ``header`` and ``rows`` (already formatted cells)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def record(title: str, table_markdown: str, command: str) -> None:
    """Append one section: title, date, machine (platform, CPU count, torch version), command, table."""
    import torch

    machine = (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        machine += f", GPU {torch.cuda.get_device_name(0)}"
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = (
        f"\n## {title}\n\n"
        f"- date: {when}\n- machine: {machine}\n- command: `{command}`\n\n"
        f"{table_markdown.rstrip()}\n"
    )
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEvery section below comes from a real run of its command.\n")
    with RESULTS.open("a", encoding="utf-8") as fh:
        fh.write(section)
