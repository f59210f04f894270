"""Start-up cost of a rankopt command: process CPU time of ``import rankopt, rankopt.cli``.

    .venv/bin/python benchmarks/bench_startup.py --against 4589d5d --record

Every command (and every process the test suite starts) pays it. Each round runs a fresh
interpreter per variant, interleaved (A B A B ...), and reads the child's user + system CPU
time; the table gives medians and the median of the per-round ratios. ``import torch``
alone is the floor. ``--against REF`` adds the tree at a git ref (checked out in a
temporary worktree) as a variant, e.g. the commit before torchvision was made lazy.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import invocation, markdown_table, record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# the editable install's finder would import the working tree whatever sys.path says
IMPORT = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path.insert(0, {tree!r}); import rankopt, rankopt.cli; "
    "assert rankopt.__file__.startswith({tree!r}), rankopt.__file__; "
    "print(int('torchvision' in sys.modules))"
)


def child_cpu(code: str) -> tuple[float, str]:
    """CPU seconds (user + system) of a fresh interpreter running ``code``, and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), out.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--against", help="a git ref whose tree is timed too")
    parser.add_argument("--record", action="store_true", help="replace this section of RESULTS.md")
    args = parser.parse_args()

    variants = {"import torch (floor)": "import torch; print(0)",
                "import rankopt, rankopt.cli (this tree)": IMPORT.format(tree=str(ROOT))}
    worktree = None
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="rankopt-startup-")) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(worktree), args.against],
                       check=True)
        variants[f"import rankopt, rankopt.cli ({args.against})"] = IMPORT.format(tree=str(worktree))
    try:
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        torchvision: dict[str, str] = {}
        for _ in range(args.rounds):
            for name, code in variants.items():
                cpu, out = child_cpu(code)
                seconds[name].append(cpu)
                torchvision[name] = out
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    this = "import rankopt, rankopt.cli (this tree)"
    rows = []
    for name, values in seconds.items():
        ratio = statistics.median(a / b for a, b in zip(values, seconds[this]))
        loaded = "-" if name.startswith("import torch") else ("yes" if torchvision[name] == "1" else "no")
        rows.append([name, f"{statistics.median(values):.2f}", f"{ratio:.2f}", loaded])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    text = (markdown_table(["interpreter runs", "CPU s (median)", "x this tree (median of rounds)",
                            "torchvision imported"], rows)
            + f"\n\n{args.rounds} interleaved rounds, process CPU time (user + system) of each child. "
            f"Load average at the end: {load}.")
    print(text)
    if args.record:
        record("Start-up: import cost of a command (bench_startup)", text, invocation())


if __name__ == "__main__":
    main()
