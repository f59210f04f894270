"""What the contract kit (``rankopt.testing``, ``rankopt plugins --check``) costs per plugin.

Run: ``.venv/bin/python benchmarks/bench_contract_kit.py [--rounds 5] [--quick] [--record]``
(about a minute on 2 CPUs; ``--quick`` does 2 rounds).

For every installed decomposer, rank selector and strategy: the process CPU time
(``time.process_time``, one torch thread) of its full check, the median over rounds.
Two ratios say what issue 16's stronger checks add, each against its previous form in
the same process, interleaved (A B A B ...) and as the median of per-round ratios:

* decomposers: the current default sample layers (8, with dilation, anisotropic stride,
  odd channels, large padding) against the previous 5 layers;
* rank selectors: checked with every installed decomposer against tucker2 only.

The machine is shared with other engineers' jobs: the load average (``uptime``) before
and after is printed and recorded next to the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import markdown_table, record  # noqa: E402

import rankopt  # noqa: E402
import rankopt.testing.samples as samples  # noqa: E402
from rankopt.testing import check_decomposer, check_rank_selector, check_strategy  # noqa: E402
from rankopt.testing.installed import _selector_checks  # noqa: E402

TITLE = "rankopt.testing: contract-check time per installed plugin (1 thread)"
# the default sample layers before the geometry layers were added
OLD_NAMES = ("conv3x3", "conv3x3_stride2_nobias", "conv1x1", "conv1x3", "linear")


def cpu_seconds(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def load() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def with_old_layers(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        saved = samples._DEFAULT_SAMPLES
        samples._DEFAULT_SAMPLES = tuple(s for s in saved if s[0] in OLD_NAMES)
        try:
            return fn()
        finally:
            samples._DEFAULT_SAMPLES = saved

    return run


def measure(rounds: int) -> tuple[list[list[str]], str]:
    reg = rankopt.get_registry()
    names = rankopt.plugin_names()
    rows = []
    for key, label, make in (
        ("decomposers", "decomposer", rankopt.decomposer),
        ("rank_selectors", "rank selector", rankopt.rank_selector),
        ("strategies", "strategy", rankopt.strategy),
    ):
        for name in names[key]:
            plugin = make(name)
            dist = reg.source_of(key, name).distribution
            if key == "decomposers":
                new: Callable[[], object] = lambda p=plugin: check_decomposer(p)  # noqa: E731
                old: Callable[[], object] | None = with_old_layers(new)
            elif key == "rank_selectors":
                new = lambda p=plugin, d=dist: _selector_checks(p, d)  # noqa: E731
                old = lambda p=plugin: check_rank_selector(p, rankopt.decomposer("tucker2"))  # noqa: E731
            else:
                new, old = (lambda p=plugin: check_strategy(p)), None
            times, ratios, results = [], [], []
            for _ in range(rounds):  # A B A B: both see the same load
                t_new, results = cpu_seconds(new)
                times.append(t_new)
                if old is not None:
                    t_old, _ = cpu_seconds(old)
                    ratios.append(t_new / max(t_old, 1e-9))
            results = list(results)  # type: ignore[call-overload]
            failed = sum(not r.passed for r in results)
            skipped = sum(r.skipped for r in results)
            row = [
                label, name, dist, str(len(results)), str(failed), str(skipped),
                f"{statistics.median(times):.2f}",
                f"{statistics.median(ratios):.2f}" if ratios else "-",
            ]
            rows.append(row)
            print(" | ".join(row), flush=True)
    table = markdown_table(
        ["family", "name", "distribution", "checks", "failed", "skipped", "CPU s (median)",
         "x previous (median ratio)"],
        rows,
    )
    return rows, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--record", action="store_true", help=f"replace the section {TITLE!r} of RESULTS.md")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(1)
    before = load()
    print(before, flush=True)
    rows, table = measure(rounds)
    after = load()
    print(table)
    print(after)
    total = sum(float(r[6]) for r in rows)
    command = "PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_contract_kit.py" + (
        " --quick" if args.quick else f" --rounds {rounds}"
    ) + " --record"
    text = (
        f"Shared with six other engineers' jobs: {before} (start), {after} (end). "
        f"CPU seconds (process time, one thread), median of {rounds} rounds; all plugins together "
        f"{total:.1f} s. 'x previous': the same check's CPU time against its form before issue 16 "
        "(decomposers: the previous 5 default sample layers; rank selectors: tucker2 only), "
        "interleaved per round, median ratio.\n\n"
        f"{table}\n"
    )
    if args.record:
        record(TITLE, text, command)


if __name__ == "__main__":
    main()
