"""Measured latency of models and layers, in the runtime that serves them.

FLOPs do not predict speed for every layer: a decomposed conv with few input channels,
or at small spatial size, can run slower than the layer it replaces, and the same
layer form runs at very different speeds in eager PyTorch and in ONNX Runtime (see
``benchmarks/RESULTS.md``, "Realized speed"). So latency is measured in the runtime
the model will be served in (``eager``, ``onnxruntime`` or ``torchscript``), on CPU
time (``time.process_time``: wall clock on a shared, loaded machine gave absurd
results), with the reference timed interleaved with the candidate in the same loop
(ABBA order, medians) so that load changes hit both alike; the ratio to the
reference is the robust figure, milliseconds are reported too.

* :func:`measure_model_latency`: a model against its reference (the ``latency``
  objective);
* :func:`keep_faster_layers`: each layer of a spec against its original, dropping the
  entries that would slow the model down; measurements are cached in memory and,
  given ``cache_dir``, on disk (a study keeps them in its run directory) keyed by the
  layer's shape, decomposer, ranks, runtime, batch and threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rankopt.core.errors import ConfigError
from rankopt.compression.surgery import LayerInfo, Spec, get_submodule, normalize_spec
from rankopt.core.safe_paths import atomic_write_text

__all__ = [
    "RUNTIMES",
    "measure_latency",
    "layer_example",
    "keep_faster_layers",
    "measure_model_latency",
    "runtime_callable",
    "time_interleaved",
]

RUNTIMES = ("eager", "onnxruntime", "torchscript")

# (key...) -> (original s, decomposed s); the process-wide layer of the cache
_MEASURED: dict[tuple[Any, ...], tuple[float, float]] = {}


def measure_latency(
    module: nn.Module, example: torch.Tensor, *, repeats: int = 15, warmup: int = 3
) -> float:
    """Median wall seconds of ``module(example)`` in eager PyTorch (CUDA synchronized)."""
    cuda = example.device.type == "cuda"
    times = []
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(example.device)
                start = time.perf_counter()
                module(example)
                if cuda:
                    torch.cuda.synchronize(example.device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        module.train(was_training)
    return statistics.median(times)


def layer_example(layer: LayerInfo, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zero input of the size ``layer`` sees in the model."""
    if layer.kind == "linear" or layer.input_hw is None:
        return torch.zeros(batch, layer.in_channels, device=device, dtype=dtype)
    return torch.zeros(batch, layer.in_channels, *layer.input_hw, device=device, dtype=dtype)


def _check_runtime(runtime: str, batch: int, threads: int) -> None:
    if runtime not in RUNTIMES:
        raise ConfigError(f"latency runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    for what, value in (("batch", batch), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"latency {what} must be a positive integer, got {value!r}")


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def runtime_callable(module: nn.Module, example: torch.Tensor, runtime: str, *, threads: int = 1) -> Callable[[], Any]:
    """A no-argument function running ``module`` on ``example`` in ``runtime``.

    ``eager``: ``module`` under ``torch.inference_mode`` on its device. ``torchscript``:
    ``torch.jit.trace`` + ``torch.jit.freeze`` on CPU. ``onnxruntime``: exported in
    memory with the TorchScript-based ONNX exporter and run by an ONNX Runtime CPU
    session with ``threads`` intra-op threads. ``module`` is not modified.
    """
    import copy

    net = copy.deepcopy(module).eval()
    if runtime == "eager":
        def run_eager() -> Any:
            with torch.inference_mode():
                return net(example)
        return run_eager
    net, x = net.cpu().float(), example.detach().cpu().float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation notices
        if runtime == "torchscript":
            with torch.no_grad():
                frozen = torch.jit.freeze(torch.jit.trace(net, (x,), check_trace=False))

            def run_script() -> Any:
                with torch.inference_mode():
                    return frozen(x)
            return run_script
        import onnxruntime as ort

        buf = io.BytesIO()
        torch.onnx.export(net, (x,), buf, dynamo=False, input_names=["input"], opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return lambda: session.run(None, feed)


def time_interleaved(
    fns: Sequence[Callable[[], Any]], *, rounds: int = 15, warmup: int = 2, min_sample_s: float = 0.002
) -> list[float]:
    """Median CPU seconds per call of each of ``fns``, timed interleaved.

    Each round times every function once, in a shuffled order (seeded) that never starts
    with the function that ended the round before, so drift hits all alike and none is
    timed right after itself, its caches warm, more often than the others. (Alternating
    ABCD, DCBA, ABCD... ran A and D twice in a row at every other turn: two copies of one
    ResNet-20 measured 1.08-1.10x apart in ONNX Runtime at batch 1; shuffled, 1.00-1.02x.)
    A sample repeats a fast function until it takes ``min_sample_s`` so the clock's
    resolution does not matter. CPU time is ``time.process_time`` (with more than one
    thread it sums the threads' work).
    """
    for fn in fns:
        for _ in range(warmup):
            fn()
    reps = []
    for fn in fns:
        start = time.process_time()
        fn()
        once = max(time.process_time() - start, 1e-6)
        reps.append(max(1, math.ceil(min_sample_s / once)))
    samples: list[list[float]] = [[] for _ in fns]
    rng = random.Random(0)
    last = None
    for _ in range(rounds):
        order = list(range(len(fns)))
        rng.shuffle(order)
        if order[0] == last:
            order[0], order[-1] = order[-1], order[0]
        for i in order:
            fn, n = fns[i], reps[i]
            start = time.process_time()
            for _ in range(n):
                fn()
            samples[i].append((time.process_time() - start) / n)
        last = order[-1]
    return [statistics.median(s) for s in samples]


def _timed_pair(
    original: nn.Module, candidate: nn.Module, example: torch.Tensor, runtime: str, threads: int, rounds: int
) -> tuple[float, float]:
    """(original s, candidate s): CPU time interleaved, or CUDA-synchronized wall time in eager on a GPU."""
    if runtime == "eager" and example.device.type == "cuda":
        return (
            measure_latency(original, example, repeats=rounds),
            measure_latency(candidate, example, repeats=rounds),
        )
    with _torch_threads(threads):
        fns = [runtime_callable(m, example, runtime, threads=threads) for m in (original, candidate)]
        t_orig, t_new = time_interleaved(fns, rounds=rounds)
    return t_orig, t_new


def measure_model_latency(
    model: nn.Module,
    reference: nn.Module,
    input_shape: Sequence[int],
    *,
    runtime: str = "eager",
    batch: int = 1,
    threads: int = 1,
    rounds: int = 15,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """``model`` against ``reference`` in ``runtime``, timed interleaved.

    Returns ``latency_ms`` (the model's median ms per batch), ``latency_reference_ms``
    and ``latency_ratio`` (model / reference: below 1 is faster), with the runtime,
    batch and threads they were measured at.
    """
    _check_runtime(runtime, batch, threads)
    dev = torch.device(device)
    if runtime != "eager":
        dev = torch.device("cpu")  # the ONNX Runtime and TorchScript runs are on CPU
    example = torch.zeros((batch, *tuple(input_shape)[1:]), device=dev)
    import copy

    ref_copy, model_copy = (copy.deepcopy(m).to(dev) for m in (reference, model))  # callers' modules stay put
    t_ref, t_model = _timed_pair(ref_copy, model_copy, example, runtime, threads, rounds)
    return {
        "latency_ms": t_model * 1e3,
        "latency_reference_ms": t_ref * 1e3,
        "latency_ratio": t_model / t_ref if t_ref > 0 else math.inf,
        "latency_runtime": runtime,
        "latency_batch": batch,
        "latency_threads": threads,
    }


def _disk_get(cache_dir: Path | None, key: tuple[Any, ...]) -> tuple[float, float] | None:
    if cache_dir is None:
        return None
    path = cache_dir / f"{_digest(key)}.json"
    try:
        data = json.loads(path.read_text())
        return float(data["original_s"]), float(data["decomposed_s"])
    except (OSError, ValueError, KeyError, TypeError):  # absent or torn: measure again
        return None


def _disk_put(cache_dir: Path | None, key: tuple[Any, ...], value: tuple[float, float]) -> None:
    if cache_dir is None:
        return
    path = cache_dir / f"{_digest(key)}.json"
    # atomic (concurrent trials never read half a file), never through a link
    atomic_write_text(path, json.dumps({"key": [str(k) for k in key], "original_s": value[0],
                                        "decomposed_s": value[1]}))


def _digest(key: tuple[Any, ...]) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()[:24]


def keep_faster_layers(
    model: nn.Module,
    spec: Mapping[str, Mapping[str, Any]],
    layers: Sequence[LayerInfo],
    *,
    batch: int = 1,
    tolerance: float = 1.0,
    repeats: int = 15,
    runtime: str = "eager",
    threads: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Spec, dict[str, str]]:
    """``spec`` without the layers whose factorized form is slower than the original.

    Each entry's module is built structure-only (latency does not depend on the
    values) and timed against the original at the input size the layer sees, at
    ``batch``, in ``runtime`` (interleaved CPU time, see :func:`time_interleaved`;
    on a GPU in eager, synchronized wall time). An entry is dropped when decomposed
    time exceeds ``tolerance`` x original time. Returns the kept spec and, per dropped
    layer, why. Measurements are cached per (layer, decomposer, ranks, options,
    runtime, batch, threads, device) for the process and in ``cache_dir`` if given.
    """
    from rankopt.contract.manager import get_registry

    _check_runtime(runtime, batch, threads)
    spec = normalize_spec(spec)
    disk = Path(cache_dir) if cache_dir is not None else None
    by_name = {info.name: info for info in layers}
    kept: Spec = {}
    dropped: dict[str, str] = {}
    for name, entry in spec.items():
        info = by_name.get(name)
        original = get_submodule(model, name)
        weight = next(original.parameters(), None)
        if info is None or weight is None:
            kept[name] = entry
            continue
        key = (
            repr(original), info.input_hw, entry["decomposer"], tuple(entry["ranks"]),
            repr(sorted((entry.get("options") or {}).items())), runtime, batch, threads,
            str(weight.device), str(weight.dtype),
        )
        if key not in _MEASURED:
            found = _disk_get(disk, key)
            if found is None:
                dec = get_registry().create("decomposers", entry["decomposer"])
                built = dec.build(original, entry["ranks"], options=entry.get("options"), initialize=False)
                built = built.to(device=weight.device, dtype=weight.dtype)
                example = layer_example(info, batch, weight.device, weight.dtype)
                found = _timed_pair(original, built, example, runtime, threads, repeats)
                _disk_put(disk, key, found)
            _MEASURED[key] = found
        t_orig, t_dec = _MEASURED[key]
        if t_dec > tolerance * t_orig:
            dropped[name] = (
                f"kept full: {entry['decomposer']} {entry['ranks']} measured "
                f"{t_dec * 1e3:.3f} ms vs {t_orig * 1e3:.3f} ms for the original "
                f"in {runtime} at batch {batch}"
            )
        else:
            kept[name] = entry
    return kept, dropped
