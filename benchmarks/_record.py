"""Write a benchmark's section of ``benchmarks/RESULTS.md`` (date, machine, command, table), in place."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import sys
from collections.abc import Sequence
from typing import Any
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table of ``header`` and ``rows`` (already formatted cells)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def invocation() -> str:
    """The command line of the running benchmark as RESULTS.md shows it, ending in --record."""
    args = [a for a in sys.argv[1:] if a != "--record"]
    return " ".join([".venv/bin/python", f"benchmarks/{Path(sys.argv[0]).name}", *args, "--record"])


def record(title: str, table_markdown: str, command: str) -> None:
    """Write one section (title, date, machine, command, table) to RESULTS.md: it replaces
    the section of the same title in place, and drops stale copies of it, so the file holds
    the latest run of each benchmark once (git keeps the history); a new title is appended."""
    import torch

    machine = (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        machine += f", GPU {torch.cuda.get_device_name(0)}"
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = (
        f"## {title}\n\n"
        f"- date: {when}\n- machine: {machine}\n- command: `{command}`\n\n"
        f"{table_markdown.rstrip()}\n"
    )
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nEvery section below comes from a real run of its command.\n")
    text = RESULTS.read_text(encoding="utf-8")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    found = list(pattern.finditer(text))
    if not found:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        for m in reversed(found[1:]):
            text = text[: m.start()] + text[m.end():]
        text = text[: found[0].start()] + section + "\n" + text[found[0].end():]
    RESULTS.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def report(title: str, text: str, write: bool, command: str | None = None) -> None:
    """Print a benchmark's text and, when ``write``, record it as the section ``title``
    (``command`` defaults to this run's own command line): every bench script ends here."""
    print(text)
    if write:
        record(title, text, command or invocation())


def mnist_splits(train_images: int, val_images: int = 2000) -> Any:
    """MNIST from ``../shared/data`` (the first ``train_images`` training and ``val_images``
    test images, normalized), with one torch thread; None, saying so, when the archives are
    absent (the benchmark is then skipped)."""
    import torch

    import rankopt

    data = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    if not (data / "mnist_train.npz").is_file():
        print(f"skipped: MNIST archives not found in {data.resolve()} (see ../shared/data/README.md)")
        return None
    torch.set_num_threads(1)  # the machine is shared; one thread is faster and steadier here
    return rankopt.dataset("npz", train="mnist_train.npz", val="mnist_test.npz", root=str(data),
                           limit={"train": train_images, "val": val_images}, mean=0.1307, std=0.3081)
