"""Cost of the search itself on a real setting (LeNet-5 on MNIST by default): per-trial time
outside training and evaluation on both backends, trials per hour with 1 and 2 concurrent
trials, what ``keep_faster_layers`` adds to a trial and what a ``screening`` candidate
costs, the spectral cache's speed-up for rank selection, and the peak memory of a trial.

    .venv/bin/python benchmarks/bench_search_cost.py --quick --record     # 2-core CPU, ~5 min
    .venv/bin/python benchmarks/bench_search_cost.py --device auto --record
    .venv/bin/python benchmarks/bench_search_cost.py --quick --two-node --record  # root

``bench_study.py`` measures the same backend figures on the tiny quickstart model; this
one uses the front-quality settings (``_baselines.py``) and reuses its ``search_figures``.
Peak memory: each trial runs in a fresh child process that first loads the data and the
reference; reported are its resident set before the trial and its peak during the trial
(Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; elsewhere the
process peak from ``resource.getrusage``), the peak of Python-level allocations during the trial (``tracemalloc``; torch
tensors are not traced by it) and, on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _baselines import markdown_table, method_config, missing_data, reference_weights, settings  # noqa: E402
from bench_study import search_figures  # noqa: E402

DEFAULT_OUT = Path("runs") / "bench_search_cost"


def backend_rows(setting: Any, weights: Path, out: Path, device: str, trials: int) -> list[list[str]]:
    """Per-trial overhead and trials per hour: local and Ray, 1 and 2 concurrent trials."""
    import rankopt

    rows = []
    runs: list[tuple[str, int]] = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]
    ray_started = False
    try:
        for backend, concurrent in runs:
            if backend == "ray" and not ray_started:
                import ray

                ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
                ray_started = True
            config = method_config(setting, "random", weights, out / f"{backend}{concurrent}", device)
            config.update(name=f"cost_{backend}{concurrent}", trials=trials, backend=backend,
                          max_concurrent=concurrent, run_dir=str(out / f"{backend}{concurrent}"))
            result = rankopt.run_study(config, progress=False)
            f = search_figures(result)
            rows.append([backend, str(concurrent), str(f["trials"]), f"{f['span_s']:.1f}",
                         f"{f['trial_s']:.2f}", f"{f['train_eval_s']:.2f}",
                         f"{f['in_trial_overhead_s']:.3f}", f"{f['backend_overhead_s']:.2f}",
                         f"{f['trials_per_hour']:.0f}"])
            print(rows[-1], flush=True)
    finally:
        if ray_started:
            import ray

            ray.shutdown()
    return rows


def two_node_rows(setting: Any, weights: Path, out: Path, device: str, trials: int) -> list[list[str]]:
    """The ray backend on one node (a local 2-CPU instance) and on a two-node cluster whose
    second node (2 CPUs; the head has none, so every trial runs there) cannot see the
    driver's run directory: its trials travel through an ``artifacts:`` folder. The
    cluster is the test suite's namespaced one (``tests/ray_cluster_support.py``, root)."""
    import shutil
    import statistics

    import rankopt
    from rankopt.results.reading import StudyResult

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from ray_cluster_support import namespaces_work, run_in_cluster

    why = namespaces_work()
    if why is not None:
        print(f"two-node row skipped: {why}", file=sys.stderr)
        return []
    rows = []
    for nodes in (1, 2):
        root = (out / f"nodes{nodes}").resolve()
        shutil.rmtree(root, ignore_errors=True)
        machine = root / "machineA"
        machine.mkdir(parents=True)
        run_dir = machine / "run"
        config = method_config(setting, "random", weights, run_dir, device)
        config.update(name=f"cost_nodes{nodes}", trials=trials, backend="ray", max_concurrent=2,
                      run_dir=str(run_dir), resources={"cpus": 1, "gpus": 0})
        if nodes == 1:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            try:
                rankopt.run_study(config, progress=False)
            finally:
                ray.shutdown()
        else:
            config["artifacts"] = str(root / "store")
            (root / "config.json").write_text(json.dumps(config, default=str))
            # relative data and weights paths: run from here, not from the cluster's folder
            script = (f"cd {Path.cwd()} && {sys.executable} -c 'import json, rankopt; rankopt.run_study("
                      f"json.load(open(\"{root / 'config.json'}\")), progress=False)'\n")
            proc = run_in_cluster(script, tmp=root, hide=machine, cpus=2, timeout=3000)
            if proc.returncode != 0:
                raise RuntimeError(f"two-node run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        result = StudyResult(run_dir)
        f = search_figures(result)
        trips = [float(t.user_attrs.get("artifact_seconds", 0.0)) for t in result.study.trials
                 if t.state.name == "COMPLETE"]
        rows.append([str(nodes), "2" if nodes == 1 else "0 + 2", str(f["trials"]), f"{f['span_s']:.1f}",
                     f"{f['trial_s']:.2f}", f"{f['in_trial_overhead_s']:.3f}",
                     f"{f['span_s'] * 2 / f['trials'] - f['trial_s']:.2f}", f"{f['trials_per_hour']:.0f}",
                     f"{statistics.median(trips) * 1000:.0f}" if nodes == 2 and trips else "-"])
        print(rows[-1], flush=True)
    return rows


def option_rows(setting: Any, weights: Path, out: Path, device: str, trials: int) -> list[list[str]]:
    """What the search's options cost: ``keep_faster_layers`` per trial (local backend, one
    trial at a time, same seeded trials with it off and on) and ``screening`` per candidate."""
    import rankopt

    rows = []
    for keep_faster in (False, True):
        name = f"options_keepfaster{int(keep_faster)}"
        config = method_config(setting, "random", weights, out / name, device)
        config.update(name=name, trials=trials, keep_faster_layers=keep_faster, run_dir=str(out / name))
        f = search_figures(rankopt.run_study(config, progress=False))
        rows.append([f"keep_faster_layers: {str(keep_faster).lower()}", f"{trials} trials",
                     f"{f['trial_s']:.2f}", f"{f['in_trial_overhead_s']:.3f}"])
        print(rows[-1], flush=True)
    candidates = 4 * trials
    name = "options_screening"
    config = method_config(setting, "rankopt_screened", weights, out / name, device)
    config.update(name=name, trials=1, screening={"candidates": candidates, "keep": 1},
                  seed_proposals=False, run_dir=str(out / name))
    rankopt.run_study(config, progress=False)
    report = json.loads((out / name / "screening.json").read_text())
    per = [c["seconds"] for c in report["candidates"]]
    rows.append([f"screening: {candidates} candidates", "per candidate (no training)",
                 f"{sum(per) / len(per):.2f}",
                 f"{(report['seconds'] - sum(per)) / len(per):.3f} (sampler, per candidate)"])
    print(rows[-1], flush=True)
    return rows


def cache_rows(setting: Any, weights: Path, out: Path) -> list[list[str]]:
    """Rank selection on the reference with a cold cache, a warm in-memory one, and a warm
    on-disk one opened by a new process (a new SpectralCache on the same directory)."""
    import shutil

    import torch

    import rankopt
    from rankopt.compression.selection import select_spec
    from rankopt.compression.spectral import SpectralCache

    in_ch, side = (1, 28) if setting.key == "mnist" else (3, 32)
    model = rankopt.model(setting.model["name"], num_classes=10, in_channels=in_ch)
    model.load_state_dict(torch.load(weights, weights_only=True))
    layers = rankopt.find_layers(model, (1, in_ch, side, side))
    decomposers = {
        info.name: ("svd" if info.kind == "linear" else "tucker2")
        for info in layers
        if not (info.kind == "conv2d" and info.in_channels < 2)
    }
    # one throwaway selection first: LAPACK and code paths start up once per process, not per cache
    select_spec(model, layers, decomposers, "energy", {"p": 0.9}, cache=SpectralCache(None),
                input_shape=(1, in_ch, side, side))
    rows = []
    for selector, params in (("energy", {"p": 0.9}), ("vbmf", {}), ("budget", {"target": 0.3})):
        directory = out / "spectra" / selector
        shutil.rmtree(directory, ignore_errors=True)

        def timed(cache: SpectralCache, repeat: int = 1) -> float:
            start = time.perf_counter()
            for _ in range(repeat):
                select_spec(model, layers, decomposers, selector, params, cache=cache,
                            input_shape=(1, in_ch, side, side))
            return (time.perf_counter() - start) / repeat

        cache = SpectralCache(directory)
        cold = timed(cache)
        warm_memory = timed(cache, repeat=5)
        warm_disk = timed(SpectralCache(directory))
        rows.append([selector, str(len(decomposers)), f"{cold * 1000:.1f}", f"{warm_memory * 1000:.2f}",
                     f"{cold / warm_memory:.0f}x", f"{warm_disk * 1000:.1f}", f"{cold / warm_disk:.1f}x"])
        print(rows[-1], flush=True)
    return rows


CHILD = r"""
import json, resource, sys, time, tracemalloc
import torch
import rankopt
from rankopt.study import Study
config = json.loads(sys.argv[1])
study = Study(config, progress=False)
prep = study._prepare()
from rankopt.search.reference import obtain_reference, reference_key
from rankopt.search.objective import TrialEnv, run_trial
run_dir = prep.run_dir
run_dir.mkdir(parents=True, exist_ok=True)
key = reference_key(prep.config, prep.base, prep.input_shape)
reference, baseline = obtain_reference(prep.config, model=prep.model, splits=prep.splits,
    input_shape=prep.input_shape, base=prep.base, targets=prep.targets, key=key, run_dir=run_dir)
env = TrialEnv(config=prep.config, run_dir=run_dir.resolve(), reference=reference, splits=prep.splits,
    input_shape=prep.input_shape, targets=prep.targets, space=prep.space, baseline=baseline,
    base=prep.base, reference_key=key)
torch.set_num_threads(1)
def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None
try:  # Linux: reset the high-water mark, so the trial's own peak is seen (not data loading's)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before, reset = status_kb("VmRSS"), True
except OSError:
    before, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
tracemalloc.start()
metrics = run_trial(env, 0, prep.enqueue[0])
_, py_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
after = status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"state": metrics["state"], "reason": metrics.get("reason"), "rss_before_kb": before,
                  "rss_after_kb": after, "python_peak_bytes": py_peak, "cuda_peak_bytes": cuda,
                  "seconds": metrics["seconds"], "ranks": metrics.get("ranks_summary")}))
"""


def memory_rows(setting: Any, weights: Path, out: Path, device: str) -> list[list[str]]:
    rows = []
    for method, label in (("vbmf", "VBMF ranks, fine-tune"), ("fraction", "fraction 0.1, fine-tune")):
        config = method_config(setting, method, weights, out / f"memory_{method}", device)
        config["name"] = f"memory_{method}"
        raw = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        m = json.loads(raw)
        if m["state"] != "COMPLETE":
            raise RuntimeError(f"memory trial failed: {m['reason']}")
        rows.append([label, m["ranks"], f"{m['rss_before_kb'] / 1024:.0f}", f"{m['rss_after_kb'] / 1024:.0f}",
                     f"{(m['rss_after_kb'] - m['rss_before_kb']) / 1024:.0f}",
                     f"{m['python_peak_bytes'] / 2**20:.1f}",
                     "-" if m["cuda_peak_bytes"] is None else f"{m['cuda_peak_bytes'] / 2**20:.0f}",
                     f"{m['seconds']:.1f}"])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU-sized data and trial counts")
    parser.add_argument("--setting", choices=["mnist", "cifar"], default="mnist")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    parser.add_argument("--trials", type=int, default=None, help="trials per backend run (quick: 6)")
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--two-node", action="store_true",
                        help="only the two-node Ray cluster row (root: private namespaces)")
    args = parser.parse_args()
    setting = settings(args.quick)[args.setting]
    absent = missing_data(setting)
    if absent:
        print(f"skipping: {absent} not found in ../shared/data (see its README)", file=sys.stderr)
        return
    trials = args.trials or (6 if args.quick else 16)
    if args.two_node:
        two_node(args, setting, trials)
        return
    import shutil

    for stale in ("local1", "local2", "ray1", "ray2", "memory_vbmf", "memory_fraction",
                  "options_keepfaster0", "options_keepfaster1", "options_screening"):
        shutil.rmtree(args.out / stale, ignore_errors=True)  # timings need fresh studies
    weights = reference_weights(setting, args.out, args.device)
    backend = markdown_table(
        ["backend", "concurrent trials", "trials", "search s", "trial s (mean)", "train+eval s",
         "in-trial overhead s", "backend overhead s per trial", "trials per hour"],
        backend_rows(setting, weights, args.out, args.device, trials))
    options = markdown_table(
        ["option", "measured over", "s per trial / candidate (mean)", "overhead s (outside train+eval)"],
        option_rows(setting, weights, args.out, args.device, trials))
    cache = markdown_table(
        ["selector", "layers", "cold ms (SVDs computed)", "warm, memory ms", "speed-up",
         "warm, disk (new process) ms", "speed-up"],
        cache_rows(setting, weights, args.out))
    memory = markdown_table(
        ["trial", "ranks", "RSS before the trial MiB", "RSS peak during the trial MiB", "trial adds MiB",
         "Python alloc. peak MiB", "CUDA peak MiB", "trial s"],
        memory_rows(setting, weights, args.out, args.device))
    text = (
        f"{setting.describe()}; random sampler over rankopt's space, {trials} trials per run, "
        "Ray on a local 2-CPU instance with 1 CPU per trial, local concurrency = Optuna threads "
        "(n_jobs). In-trial overhead = rank selection, decomposition, counting and saving; "
        "backend overhead = search wall time per trial beyond the trials (with 2 concurrent "
        f"trials it is not meaningful, trials overlap).\n\n{backend}\n\n"
        "The search's options (local backend, one trial at a time; `keep_faster_layers` times "
        "each decomposed layer against its original, `screening` evaluates a candidate "
        f"without training):\n\n{options}\n\n"
        f"Rank selection over the whole model (`select_spec`), cold vs warm spectral cache:\n\n{cache}\n\n"
        f"Peak memory of one trial (fresh process, data and reference loaded first):\n\n{memory}"
    )
    from _record import report

    report("Cost of the search: overhead, throughput, options, spectral cache, peak memory", text, args.record)


def two_node(args: Any, setting: Any, trials: int) -> None:
    import os

    load = os.getloadavg()
    weights = reference_weights(setting, args.out, args.device)
    table = markdown_table(
        ["Ray nodes", "CPUs (head + node 2)", "trials", "search s", "trial s (mean)",
         "in-trial overhead s", "slot overhead s per trial", "trials per hour",
         "artifact trip ms (median: upload + fetch)"],
        two_node_rows(setting, weights, args.out, args.device, trials))
    load_after = os.getloadavg()
    text = (
        f"{setting.describe()}; random sampler, {trials} trials per run, 2 concurrent trials of "
        "1 CPU each. One node: a local 2-CPU Ray instance, the run directory shared by nature. "
        "Two nodes: a head without CPUs and a second node with 2 CPUs in its own mount "
        "namespace (an empty tmpfs over the driver's folder), inside a private network/PID "
        "namespace; every trial ran on the second node, and its folder came back through an "
        "`artifacts:` folder (upload from the worker + fetch by the driver = artifact trip). "
        "Slot overhead = search span x 2 slots / trials - mean trial time: what a trial slot "
        "spends outside trials (Tune, Optuna, scheduling, the artifact trip). The artifact "
        "store here is a local folder: the trip is what rankopt adds, not a network's. "
        "The two runs are sequential, not interleaved; other engineers were loading the "
        f"machine: load average (1/5/15 min) {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} before, "
        f"{load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f} after.\n\n{table}"
    )
    from _record import report

    report("Cost of the search on a two-node Ray cluster (no shared file system)", text, args.record)


if __name__ == "__main__":
    main()
