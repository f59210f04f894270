"""The torchvision classification zoo, compressed on every listed layer (issue 27).

Run: ``.venv/bin/python benchmarks/bench_zoo.py [--max-params 32e6] [--models a,b] [--record]``
(random weights, nothing downloaded; some 40 models, 20-60 minutes on 2 loaded CPUs;
results are kept in ``--cache`` (JSON lines) so an interrupted run resumes where it stopped).

Every architecture of ``torchvision.models.list_models(module=torchvision.models)`` up to
``--max-params`` (default 32M: ResNet-50's 25.6M, Swin-T's 28M and MaxViT-T's 31M), plus
ViT-B/16 (86M), is built with random weights (seed 0; heads that torchvision zero-initializes
get normal(0, 0.02) weights, so that logits are not all 0) and:

1. :func:`rankopt.compression.layer_census` at its input size (224x224, Inception-v3 299x299) with a
   study's default decomposers (tucker2, svd): layers listed by find_layers (of which
   Linear), compressible, refused and skipped, with the reasons;
2. every compressible layer at full rank (svd on Linear, tucker2 on Conv2d): the largest
   relative error of the logits, ``||y - y'|| / ||y||`` on a batch of 2 N(0, 1) inputs;
   (with the logits' dependence on the input, ``||y0 - y1|| / ||y||``, next to it);
3. the same at half of every largest rank: the model must run and keep its output shape;
4. for a sample (``--onnx``), the half-rank model exported with :func:`rankopt.export`:
   the largest absolute difference between ONNX Runtime and PyTorch (checked <= 1e-3),
   and that difference over the largest absolute logit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _record import invocation, markdown_table, record  # noqa: E402

import rankopt  # noqa: E402
from rankopt.compression.surgery import get_submodule  # noqa: E402

TITLE = "Model zoo: every torchvision classifier up to ResNet-50 size, compressed on every layer (bench_zoo)"
ALWAYS = ("vit_b_16",)  # the done-when model, above the size cap
ONNX_SAMPLE = ("vit_b_16", "swin_t", "maxvit_t", "resnet50", "mobilenet_v3_small", "efficientnet_b0")
TOO_BIG = ("8gf", "16gf", "32gf", "128gf")  # regnets that cannot be sized on 'meta', all > 39M


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _kwargs(name: str) -> dict[str, Any]:
    if name in ("googlenet", "inception_v3"):
        return {"init_weights": False}  # torchvision's scipy truncnorm init takes minutes
    return {}


def zoo(max_params: float) -> list[tuple[str, int]]:
    """(name, params) of every classifier up to ``max_params``, and ALWAYS."""
    out = []
    for name in torchvision.models.list_models(module=torchvision.models):
        if any(name.endswith(s) for s in TOO_BIG):
            continue
        try:
            with torch.device("meta"):
                net = torchvision.models.get_model(name, weights=None, **_kwargs(name))
        except Exception:  # regnets copy data at init: size them for real
            net = torchvision.models.get_model(name, weights=None, **_kwargs(name))
        params = sum(p.numel() for p in net.parameters())
        if params <= max_params or name in ALWAYS:
            out.append((name, params))
    return sorted(out, key=lambda item: item[1])


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, **_kwargs(name)).eval()
    for m in net.modules():
        if isinstance(m, nn.Linear) and not m.weight.detach().any():
            nn.init.normal_(m.weight, std=0.02)
    return net


def spec_at(net: nn.Module, layers: list[rankopt.LayerInfo], keep: set[str], fraction: float) -> dict[str, Any]:
    spec = {}
    for la in layers:
        if la.name not in keep:
            continue
        dec = "svd" if la.kind == "linear" else "tucker2"
        largest = rankopt.decomposer(dec).max_ranks(get_submodule(net, la.name))
        spec[la.name] = {"decomposer": dec, "ranks": [max(1, int(r * fraction)) for r in largest]}
    return spec


def measure(name: str, params: int, onnx: bool, tmp: Path) -> dict[str, Any]:
    start = time.time()
    size = 299 if name == "inception_v3" else 224
    shape = (1, 3, size, size)
    row: dict[str, Any] = {"model": name, "params": params, "input": size}
    net = build(name)
    census = rankopt.layer_census(net, shape)
    layers = rankopt.find_layers(net, shape)
    row.update(
        listed=len(layers), linear=sum(la.kind == "linear" for la in layers),
        compressible=len(census.compressible), refused=census.refused_by_reason(),
        skipped=census.skipped_by_reason(),
    )
    keep = set(census.compressible)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = net(x)
        row["signal"] = signal(want)
        full = rankopt.compress(net, spec_at(net, layers, keep, 1.0), input_shape=shape)
        row["full_rank_rel_err"] = float((full(x) - want).norm() / want.norm())
        del full
        half = rankopt.compress(net, spec_at(net, layers, keep, 0.5), input_shape=shape)
        got = half(x)
    row["half_rank_runs"] = tuple(got.shape) == tuple(want.shape)
    row["half_rank_params"] = sum(p.numel() for p in half.parameters())
    if onnx:
        result = rankopt.export(half, tmp / f"{name}.onnx", input_shape=shape, inputs=x, tolerance=1e-3)
        row["onnx_max_abs_diff"] = result.max_abs_diff
        row["onnx_rel_diff"] = result.max_abs_diff / float(got.abs().max())  # to the logits' scale
        (tmp / f"{name}.onnx").unlink()
    row["seconds"] = round(time.time() - start, 1)
    return row


def signal(logits: torch.Tensor) -> float:
    """How much the logits depend on the input: ||y0 - y1|| / ||y|| over the two samples.
    Near 0, the logits are the head's bias (activations vanish in a random deep net) and the
    full-rank error says little about the body."""
    return float((logits[0] - logits[1]).norm() / logits.norm())


def add_signal(cache: Path) -> None:
    """Fill ``signal`` into cached rows measured before it was recorded (same seed, same input)."""
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    for row in rows:
        if "signal" in row or "error" in row:
            continue
        net = build(row["model"])
        x = torch.randn(2, 3, row["input"], row["input"])
        with torch.no_grad():
            row["signal"] = signal(net(x))
        print(row["model"], row["signal"], flush=True)
    cache.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _reasons(counts: dict[str, int]) -> str:
    return "; ".join(f"{k} {reason}" for reason, k in counts.items()) or "0"


def render(rows: list[dict[str, Any]], note: str, zoo_size: int) -> str:
    header = ["model", "params", "listed (Linear)", "compressible", "refused", "skipped", "logit signal", "full-rank rel. err",
              "half rank runs", "ONNX max abs diff", "s"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], f"{r['params'] / 1e6:.1f}M", "", "", "", "", "", "", f"error: {r['error']}", "", ""])
            continue
        body.append([
            r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['listed']} ({r['linear']})", str(r["compressible"]),
            _reasons(r["refused"]), _reasons(r["skipped"]),
            f"{r['signal']:.0e}" if "signal" in r else "", f"{r['full_rank_rel_err']:.1e}",
            "yes" if r["half_rank_runs"] else "NO",
            (f"{r['onnx_max_abs_diff']:.1e}" + (f" ({r['onnx_rel_diff']:.0e} rel.)" if "onnx_rel_diff" in r else ""))
            if "onnx_max_abs_diff" in r else "",
            f"{r['seconds']:.0f}",
        ])
    ok = [r for r in rows if "error" not in r]
    refused: dict[str, int] = {}
    skipped: dict[str, int] = {}
    for r in ok:
        for src, dst in ((r["refused"], refused), (r["skipped"], skipped)):
            for reason, k in src.items():
                dst[reason] = dst.get(reason, 0) + k
    worst = max((r["full_rank_rel_err"] for r in ok), default=float("nan"))
    weak = [r["model"] for r in ok if r.get("signal", 1.0) < 1e-3]
    summary = (
        f"{len(rows)} of the {zoo_size} zoo models run, {len(ok)} without error; {sum(r['listed'] for r in ok)} layers listed "
        f"({sum(r['linear'] for r in ok)} Linear, attention projections included), "
        f"{sum(r['compressible'] for r in ok)} compressible, {sum(refused.values())} refused "
        f"({_reasons(refused)}), {sum(skipped.values())} skipped ({_reasons(skipped)}). "
        f"Largest full-rank relative error {worst:.1e}; half rank runs with the same output shape on "
        f"{sum(r['half_rank_runs'] for r in ok)}/{len(ok)}; ONNX checked on "
        f"{sum('onnx_max_abs_diff' in r for r in ok)}. Logit signal = ||y0 - y1|| / ||y||: below 1e-3 "
        f"({', '.join(weak) or 'none'}) a random-weight net's logits are its head's bias, and the "
        "full-rank error says little about the body."
    )
    return f"{summary}\n\n{note}\n\n{markdown_table(header, body)}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-params", type=float, default=32e6)
    parser.add_argument("--models", default="", help="comma-separated names (default: the zoo)")
    parser.add_argument("--onnx", default=",".join(ONNX_SAMPLE), help="models whose half-rank form is exported")
    parser.add_argument("--first", default="vit_b_16,swin_t,maxvit_t", help="models run first (the done-when ones)")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_zoo.jsonl"))
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--add-signal", action="store_true", help="fill the logit signal into cached rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = load()
    models = zoo(args.max_params)
    if args.models:
        wanted = set(args.models.split(","))
        models = [(n, p) for n, p in models if n in wanted]
    args.cache.parent.mkdir(parents=True, exist_ok=True)
    if args.add_signal and args.cache.exists():
        add_signal(args.cache)
    done = {}
    if args.cache.exists():
        for line in args.cache.read_text().splitlines():
            row = json.loads(line)
            done[row["model"]] = row
    onnx = set(args.onnx.split(",")) if args.onnx else set()
    tmp = args.cache.parent / "bench_zoo_onnx"
    tmp.mkdir(exist_ok=True)
    first = args.first.split(",") if args.first else []
    order = sorted(models, key=lambda item: item[0] not in first)  # stable: by size otherwise
    for name, params in order:
        if name in done:
            continue
        try:
            row = measure(name, params, name in onnx, tmp)
        except Exception as exc:  # recorded, not hidden: the table shows it
            traceback.print_exc()
            row = {"model": name, "params": params, "error": f"{type(exc).__name__}: {str(exc)[:150]}"}
        done[name] = row
        with args.cache.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    rows = [done[n] for n, _ in models if n in done]
    note = (f"Random weights, one torch thread; load average before {load_before}, after {load()} "
            "(2 cores shared with other engineers' jobs, so the seconds are only indicative).")
    skipped_models = [n for n, _ in models if n not in done]
    if skipped_models:
        note += f" Not run yet (time): {', '.join(skipped_models)}."
    text = render(rows, note, len(models))
    print(text)
    if args.record:
        record(TITLE, text, invocation())


if __name__ == "__main__":
    main()
