"""What the ray backend costs (issue 28, item 10), and what a model costs to come home.

1. Per-trial overhead: the same tiny study (a strategy that sleeps ``D`` seconds, then a
   negligible fine-tune) on the local backend and on the ray backend (one local Ray
   instance, started once outside the timing; its start is timed on its own), with
   Tune's lean settings (``LEAN_TUNE_ENV``: no per-trial result loggers, rare
   experiment snapshots, no checkpoints) and without them. Per-trial overhead =
   (ray - local) / trials, for wall time and for CPU time (driver plus every process Ray
   started: raylet, GCS, workers). Variants interleaved over rounds; medians.
2. Model transfer: a ResNet-18-sized trial folder (torchvision's resnet18 saved as
   ``model.pt``) sent by a Ray task to the inbox actor on the driver's node
   (:mod:`rankopt.search.ray_inbox`), bytes and seconds per model (median of rounds).
   On this machine both ends are one node, so it is the object store's serialization and
   copy, not a network.

    .venv/bin/python benchmarks/bench_ray_overhead.py [--rounds 2] [--record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def register_sleep_strategy() -> None:
    """Ray's worker_process_setup_hook: every worker (and the driver) knows ``sleepy``."""
    if str(HERE.parent / "tests") not in sys.path:
        sys.path.insert(0, str(HERE.parent / "tests"))  # reliability_support, in Ray's workers too
    import rankopt
    from rankopt.contract.hookspecs import hookimpl
    from rankopt.core.records import StrategyInfo
    from reliability_support import SlowStrategy

    class Sleepy(SlowStrategy):
        """The tests' ``slow`` strategy with the benchmark's shorter sleep and fine-tune."""

        name = "sleepy"
        description = "benchmark strategy: sleeps, then a negligible fine-tune"

        def defaults(self) -> dict[str, Any]:
            return {"sleep": 0.3, "epochs": 0.01, "lr": 0.02}

    class Plugin:
        @staticmethod
        @hookimpl
        def rankopt_strategies() -> list[StrategyInfo]:
            return [StrategyInfo("sleepy", Sleepy, "benchmark strategy: sleeps")]

    try:
        rankopt.register_plugin(Plugin)
    except Exception:  # noqa: BLE001 - registered already in this process
        pass


def study(run_dir: Path, backend: str, sleep: float, trials: int) -> dict[str, Any]:
    return {
        "name": "overhead", "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits", "batch_size": 256}, "reference": {"epochs": 0.05, "lr": 0.05},
        "decomposers": ["svd"], "selectors": {"energy": {"p": {"low": 0.5, "high": 0.95}}},
        "strategies": {"sleepy": {"sleep": sleep}}, "sampler": {"name": "random", "seed": 0},
        "trials": trials, "backend": backend, "max_concurrent": 1, "seed_proposals": False,
        "resources": {"cpus": 1, "gpus": 0}, "run_dir": str(run_dir),
    }


def _ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def tree_cpu() -> float:
    """CPU seconds of this process and of every live process descended from it."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
                parents[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in mine:
                mine.add(child)
                frontier.append(child)
    return sum(_ticks(p) for p in mine) / os.sysconf("SC_CLK_TCK")


def timed_study(config: dict[str, Any]) -> tuple[float, float]:
    import rankopt

    cpu, wall = tree_cpu(), time.perf_counter()
    rankopt.run_study(config, progress=False)
    return time.perf_counter() - wall, tree_cpu() - cpu


def overhead(rounds: int) -> list[list[str]]:
    import ray

    from rankopt.search import ray_backend

    lean = dict(ray_backend.LEAN_TUNE_ENV)
    rows = []
    for sleep, trials in ((0.3, 8), (10.0, 2)):
        samples: dict[str, list[tuple[float, float]]] = {"local": [], "ray lean": [], "ray default": []}
        for _ in range(rounds):
            for variant in samples:  # interleaved
                ray_backend.LEAN_TUNE_ENV = lean if variant == "ray lean" else {}
                backend = "local" if variant == "local" else "ray"
                with tempfile.TemporaryDirectory() as tmp:
                    samples[variant].append(timed_study(study(Path(tmp) / "run", backend, sleep, trials)))
        ray_backend.LEAN_TUNE_ENV = lean
        base_wall = statistics.median(w for w, _ in samples["local"])
        base_cpu = statistics.median(c for _, c in samples["local"])
        for variant in ("ray default", "ray lean"):
            wall = statistics.median(w for w, _ in samples[variant])
            cpu = statistics.median(c for _, c in samples[variant])
            rows.append([f"{sleep:g} s", str(trials), variant, f"{base_wall:.1f}", f"{wall:.1f}",
                         f"{(wall - base_wall) / trials:.2f}", f"{(cpu - base_cpu) / trials:.2f}"])
    assert ray.is_initialized()
    return rows


def transfer(rounds: int) -> list[list[str]]:
    import ray
    import torch
    import torchvision

    from rankopt.search.ray_inbox import send_home, start_inbox

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "worker" / "trials" / "0"
        folder.mkdir(parents=True)
        model = torchvision.models.resnet18(num_classes=1000)
        torch.save(model.state_dict(), folder / "model.pt")
        (folder / "metrics.json").write_text('{"trial": 0, "state": "COMPLETE"}')
        inbox, _node = start_inbox(root / "driver")

        @ray.remote(num_cpus=1)
        def send(n: int) -> dict[str, float]:
            # "another node": a driver node id that is not this one, so the folder is sent
            return send_home(inbox, "elsewhere", folder, n)

        results = [ray.get(send.remote(n)) for n in range(rounds)]
        ray.kill(inbox)
        assert (root / "driver" / "trials" / "0" / "model.pt").stat().st_size == (folder / "model.pt").stat().st_size
    params = sum(p.numel() for p in model.parameters())
    seconds = statistics.median(r["transfer_seconds"] for r in results)
    size = results[0]["transfer_bytes"]
    return [["resnet18 (torchvision)", f"{params:,}", f"{size / 1e6:.1f} MB", f"{seconds:.3f}",
             f"{size / 1e6 / seconds:.0f} MB/s", str(rounds)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--transfer-rounds", type=int, default=5)
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    register_sleep_strategy()
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "bench_ray_overhead.register_sleep_strategy"})
    ray_start = time.perf_counter() - start
    try:
        rows = overhead(args.rounds)
        moved = transfer(args.transfer_rounds)
    finally:
        ray.shutdown()
    load = os.getloadavg()
    from _record import invocation, markdown_table, record

    table = (
        markdown_table(["trial", "trials", "variant", "local wall s", "ray wall s",
                        "overhead wall s/trial", "overhead CPU s/trial"], rows)
        + f"\n\nRay's own start (`ray.init`, a local instance of 2 CPUs): {ray_start:.1f} s, "
        "paid once per driver and only on the ray backend. `ray default`: Tune's result "
        "loggers and experiment snapshots on; `ray lean`: rankopt's settings "
        "(`LEAN_TUNE_ENV`, no checkpoints; actors reused). CPU counts the driver and every "
        "process Ray started. Each figure is (ray - local) / trials for one run, so it "
        "includes Tune's per-run setup (the Tuner, its experiment folder, the model inbox "
        "actor) spread over the trials.\n\n### Model transfer through Ray (no `artifacts:`)\n\n"
        + markdown_table(["model", "params", "bytes", "seconds per model (median)",
                          "throughput", "rounds"], moved)
        + "\n\nA Ray task sends the trial folder to the inbox actor on the driver's node "
        "(`rankopt.search.ray_inbox`); both are one node here, so this is serialization and "
        "the object store's copies, not a network.\n\n"
        f"Load average during the run: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(1/5/15 min) on 2 cores shared with other work: wall figures are inflated."
    )
    print(table)
    if args.record:
        record("Ray backend overhead per trial", table, invocation())


if __name__ == "__main__":
    main()
