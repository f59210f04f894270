"""Alignment by default (issue 29, item 4): how much of their FLOP cut the default front's
picks realize in ONNX Runtime on ResNet-18-CIFAR, with ``rank_multiple: auto`` (the
default) and with exact ranks (``rank_multiple: 1``).

    .venv/bin/python benchmarks/bench_alignment.py --record     # about 15 min CPU on 1 thread
    .venv/bin/python benchmarks/bench_alignment.py --report --record   # the section from results.json

The reference: no trained ResNet-18-CIFAR exists here, and a full training run does not
fit a shared 2-core CPU, so it is trained briefly (:func:`train_reference`: one epoch over
10,000 images of batches 1-4, batch 64, one-cycle SGD to lr 0.05, label smoothing 0.1, no
augmentation (one pass cannot overfit; one-cycle to lr 0.2 at batch 128 ended at 0.17);
cached under ``runs/bench_alignment/``). Its weights are real enough for the spectrum-
reading selectors (energy, VBMF) to choose from a trained spectrum; the budget and
fraction selectors depend little on the weights.

The picks: the one-shot proposals of the front benchmark's study
(``_baselines.search_space_config``: energy, fixed per layer, vbmf, budget; 3 spread points
per selector, as ``seed_proposals: 3``), i.e. every selector's defaults and spread points,
the uniform rate sweep and the VBMF sweep (:mod:`rankopt.search.seeding`), plus the budget
selector on FLOPs at 2x, 4x and 6x. Each is turned into a spec exactly as a trial does
(``SearchSpace.plan`` then ``select_spec`` with the study's targets, ``min_saving``, thin
stems dense, calibration on, as a study's defaults), once with ``rank_multiple`` auto and
once with 1, compressed, exported with ``rankopt.export`` (BatchNorm folded, ONNX opset
17) and timed in ONNX Runtime on one thread: process CPU time, the reference and both
variants interleaved in one process (``time_interleaved``, shuffled rounds), medians.
FLOPs are ``rankopt.count`` (torch.utils.flop_counter). Accuracy before fine-tuning on
the first ``--val`` images of batch 5, run in the exported ONNX file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_reference_cifar import DATA, load  # noqa: E402

OUT = Path("runs") / "bench_alignment"
MODEL = "resnet18_cifar"
SHAPE = (1, 3, 32, 32)
BUDGET_FLOP_RATES = (2.0, 4.0, 6.0)


# -- the reference ------------------------------------------------------------------------------


def train_reference(path: Path, images: int = 10_000, epochs: int = 1, seed: int = 0) -> dict[str, Any]:
    """Train ResNet-18-CIFAR briefly (see the module docstring) and save its state_dict."""
    import rankopt

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load([f"cifar10_train_{k}.npz" for k in (1, 2, 3, 4)])
    pick = torch.randperm(len(x), generator=g)[:images]
    x, y = x[pick], y[pick]
    model = rankopt.model(MODEL, num_classes=10, in_channels=3)
    batch = 64
    steps = epochs * ((len(x) + batch - 1) // batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.process_time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
        print(f"reference epoch {epoch + 1}/{epochs} ({time.process_time() - start:.0f} s CPU)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    info = {"images": images, "epochs": epochs, "seed": seed, "cpu_s": round(time.process_time() - start, 1)}
    path.with_suffix(".json").write_text(json.dumps(info))
    return info


# -- the picks ----------------------------------------------------------------------------------


def study_config() -> Any:
    """The front benchmark's search study, on ResNet-18-CIFAR (only its selectors, decomposers
    and defaults matter here: targets, min_saving, calibration, rank_multiple)."""
    from _baselines import search_space_config

    from rankopt.config.schema import load_config

    return load_config({
        "name": "bench_alignment", "model": {"name": MODEL}, "decomposers": ["tucker2", "svd"],
        "selectors": search_space_config(None), "seed_proposals": 3, "trials": 48,
        "objectives": ["accuracy", "params", "flops"],
    })


def _label(point: dict[str, Any], source: str) -> str:
    selector = point.get("selector", "?")
    if source != "proposal":
        return source
    params = {k.split(".", 1)[1]: v for k, v in point.items() if k.startswith(f"{selector}.")}
    if selector == "fixed":
        fractions = sorted({float(v) for v in params.values()})
        return f"fixed, every layer at fraction {fractions[0]:.3g}" if len(fractions) == 1 else "fixed per layer"
    return f"{selector} " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def picks(cfg: Any, reference: nn.Module, targets: Any, cache: Any) -> list[tuple[str, dict[str, Any]]]:
    """``(label, point)``: the study's one-shot proposals in its enqueue order, then the
    budget selector on FLOPs at :data:`BUDGET_FLOP_RATES`."""
    from rankopt.search.seeding import (
        SHRINK_RATES, UNIFORM_RATES, anchored_proposals, proposal_points, strategy_point, uniform_proposals,
    )
    from rankopt.search.space import SearchSpace

    space = SearchSpace(cfg, reference, targets)
    out: list[tuple[str, dict[str, Any]]] = []
    out += [(_label(p, "proposal"), p) for p in proposal_points(space, 3)]
    out += [(f"uniform sweep {r:g}x", p) for r, p in zip(UNIFORM_RATES, uniform_proposals(space, reference))]
    anchored = anchored_proposals(space, reference, targets, cache=cache,
                                  min_in_channels=cfg.targets.dense_input_channels + 1,
                                  min_saving=cfg.targets.min_saving)
    out += [(f"VBMF sweep {r:g}x", p) for r, p in zip(SHRINK_RATES, anchored)]
    common = strategy_point(space)
    for rate in BUDGET_FLOP_RATES:
        point = {"selector": "budget", "budget.target": round(1.0 / rate, 6), "budget.measure": "flops", **common}
        out.append((f"budget flops {rate:g}x", point))
    seen: list[dict[str, Any]] = []
    unique = []
    for label, point in out:
        if point not in seen:
            seen.append(point)
            unique.append((label, point))
    return unique


# -- measuring ----------------------------------------------------------------------------------


def session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_accuracy(sess: Any, x: np.ndarray, y: np.ndarray) -> float:
    hits = 0
    for i in range(0, len(x), 250):
        (logits,) = sess.run(None, {"input": x[i:i + 250]})
        hits += int((logits.argmax(1) == y[i:i + 250]).sum())
    return hits / len(x)


def ort_timer(sess: Any, batch: int) -> Any:
    feed = {"input": np.zeros((batch, *SHAPE[1:]), dtype=np.float32)}
    return lambda: sess.run(None, feed)


def calibrate_reference(reference: nn.Module, cfg: Any, targets: Any, path: Path) -> None:
    """The study's calibration (512 training images, seeded; patch moments since svd is a
    decomposer), attached to ``reference``; cached at ``path`` (delete it with the weights)."""
    from rankopt.compression.calibration import (
        attach_statistics, collect_input_statistics, load_statistics, save_statistics,
    )

    settings = cfg.calibration
    names = [t.name for t in targets]
    stats = load_statistics(path, names) if path.is_file() else None
    if stats is None:
        x, _ = load(["cifar10_train_1.npz"])
        g = torch.Generator().manual_seed(cfg.seed)
        x = x[torch.randperm(len(x), generator=g)[: settings.images]]
        stats = collect_input_statistics(reference, names, [x[i:i + 128] for i in range(0, len(x), 128)],
                                         images=settings.images, patch_layers=names, damping=settings.damping,
                                         spectra=settings.spectra)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_statistics(path, stats)
    attach_statistics(reference, stats)


def layer_rows(spec_auto: dict[str, Any], spec_exact: dict[str, Any]) -> str:
    names = sorted(set(spec_auto) | set(spec_exact), key=lambda n: list({**spec_exact, **spec_auto}).index(n))
    return "; ".join(f"{n}: {spec_exact.get(n, {}).get('ranks', 'dense')} -> {spec_auto.get(n, {}).get('ranks', 'dense')}"
                     for n in names if spec_exact.get(n, {}).get("ranks") != spec_auto.get(n, {}).get("ranks"))


def summary(raw: list[dict[str, Any]], ref_flops: int, aim: float = 0.85) -> str:
    """Per variant: the median share at batch 1 and 32, and the picks under ``aim`` at batch 1."""
    import statistics

    lines = []
    for key, name in (("exact", "exact ranks (rank_multiple 1)"), ("auto", "rank_multiple auto")):
        shares = {b: [r[key]["speed"][b] * r[key]["flops"] / ref_flops for r in raw] for b in (1, 32)}
        under = [f"{r['label']} ({s:.2f})" for r, s in zip(raw, shares[1]) if s < aim]
        lines.append(f"- {name}: median share {statistics.median(shares[1]):.2f} at batch 1, "
                     f"{statistics.median(shares[32]):.2f} at batch 32; {len(raw) - len(under)} of {len(raw)} "
                     f"picks at or above {aim:g} at batch 1" + (f"; under it: {', '.join(under)}" if under else ""))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=11, help="timing rounds at batch 1 (2/3 at 32)")
    parser.add_argument("--val", type=int, default=1000, help="images of batch 5 for accuracy")
    parser.add_argument("--limit", type=int, default=0, help="only the first N picks (a smoke run)")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--report", action="store_true", help="only render results.json (of a run cut short)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref_path = args.out / "resnet18_cifar_ref.pt"
    if not (DATA / "cifar10_train_5.npz").is_file():
        print(f"skipped: the CIFAR-10 archives are not in {DATA}", file=sys.stderr)
        return 0
    if args.report:
        render(args.out / "results.json", args.record)
        return 0
    if not ref_path.is_file():
        train_reference(ref_path)
    if args.train_only:
        return 0
    import rankopt
    from _record import invocation

    from rankopt.compression.latency import time_interleaved
    from rankopt.compression.spectral import SpectralCache, set_default_cache
    from rankopt.compression.selection import select_spec
    from rankopt.config.schema import resolve_rank_multiple
    from rankopt.search.building import find_targets
    from rankopt.search.space import SearchSpace

    cpu0, load0 = time.process_time(), os.getloadavg()
    train_info = json.loads(ref_path.with_suffix(".json").read_text())
    reference = rankopt.model(MODEL, num_classes=10, in_channels=3)
    reference.load_state_dict(torch.load(ref_path, weights_only=True))
    reference.eval()
    cfg = study_config()
    targets = find_targets(cfg, reference, SHAPE)
    calibrate_reference(reference, cfg, targets, args.out / "cache" / "calibration.pt")
    cache = SpectralCache(args.out / "cache" / "spectra")
    set_default_cache(cache)
    auto = resolve_rank_multiple(cfg, "cpu")
    space = SearchSpace(cfg, reference, targets)
    chosen = picks(cfg, reference, targets, cache)
    # the budget targets first, the fixed fractions and the uniform sweep (the extremes) last:
    # on a loaded machine a cut-short run (--report renders it) has measured the middle
    chosen.sort(key=lambda c: (0 if c[0].startswith("budget flops") else
                               2 if c[0].startswith(("fixed", "uniform")) else 1))
    if args.limit:
        chosen = chosen[: args.limit]
    xv, yv = load(["cifar10_train_5.npz"])
    xv, yv = xv[: args.val].numpy(), yv[: args.val].numpy()

    files = args.out / "onnx"
    files.mkdir(parents=True, exist_ok=True)
    rankopt.export(reference, files / "reference.onnx", input_shape=SHAPE)
    ref_sess = session(files / "reference.onnx")
    ref_flops = rankopt.count(reference, SHAPE).flops
    ref_acc = ort_accuracy(ref_sess, xv, yv)
    print(f"reference: {ref_flops:,} FLOPs, accuracy {ref_acc:.4f}; auto = {auto}; {len(chosen)} picks", flush=True)

    rows: list[list[str]] = []
    raw: list[dict[str, Any]] = []
    for k, (label, point) in enumerate(chosen):
        plan = space.plan(point)
        variant: dict[str, dict[str, Any]] = {}
        for key, multiple in (("auto", auto), ("exact", 1)):
            spec, _ = select_spec(reference, targets, plan.decomposers, plan.selector, plan.selector_params,
                                  cache=cache, input_shape=SHAPE, rank_multiple=multiple,
                                  min_in_channels=cfg.targets.dense_input_channels + 1,
                                  min_saving=cfg.targets.min_saving)
            if key == "exact" and spec == variant["auto"]["spec"]:
                variant[key] = variant["auto"]
                continue
            model = rankopt.compress(reference, spec, input_shape=SHAPE).eval()
            path = files / f"pick{k}_{key}.onnx"
            rankopt.export(model, path, input_shape=SHAPE)
            sess = session(path)
            variant[key] = {"spec": spec, "flops": rankopt.count(model, SHAPE).flops,
                            "params": sum(p.numel() for p in model.parameters()),
                            "acc": ort_accuracy(sess, xv, yv), "sess": sess}
        same = variant["exact"] is variant["auto"]
        speed: dict[str, dict[int, float]] = {"auto": {}, "exact": {}}
        for batch in (1, 32):
            sessions = [ref_sess, variant["auto"]["sess"]] + ([] if same else [variant["exact"]["sess"]])
            rounds = args.rounds if batch == 1 else max(5, args.rounds * 2 // 3)
            times = time_interleaved([ort_timer(s, batch) for s in sessions], rounds=rounds)
            speed["auto"][batch] = times[0] / times[1]
            speed["exact"][batch] = times[0] / times[-1]
        record = {"label": label, "point": point, "same": same}
        cells = [label]
        for key in ("exact", "auto"):
            v = variant[key]
            flop_x = ref_flops / v["flops"]
            record[key] = {"spec": v["spec"], "flops": v["flops"], "params": v["params"], "acc": v["acc"],
                           "speed": speed[key]}
            cells += [f"{flop_x:.2f}", *(f"{speed[key][b]:.2f}" for b in (1, 32)),
                      *(f"{speed[key][b] / flop_x:.2f}" for b in (1, 32)), f"{v['acc']:.4f}"]
        changed = [n for n in set(variant["auto"]["spec"]) | set(variant["exact"]["spec"])
                   if variant["auto"]["spec"].get(n) != variant["exact"]["spec"].get(n)]
        cells.append(f"{len(changed)} of {len(targets)}")
        rows.append(cells)
        raw.append(record)
        print(" | ".join(cells), flush=True)
        for v in variant.values():
            v.pop("sess", None)
        meta = {"reference": {"flops": ref_flops, "acc": ref_acc}, "train": train_info, "auto": str(auto),
                "val": args.val, "rounds": args.rounds, "command": invocation(), "picks_total": len(chosen),
                "cpu_s": time.process_time() - cpu0, "load_start": load0[0], "load_now": os.getloadavg()[0]}
        (args.out / "results.json").write_text(json.dumps({**meta, "rows": rows, "picks": raw}, indent=1, default=str))
    render(args.out / "results.json", args.record)
    return 0


def render(path: Path, write: bool) -> None:
    """The RESULTS.md section from ``results.json`` (also of a run cut short)."""
    from _record import markdown_table, report

    data = json.loads(path.read_text())
    rows, raw, train_info = data["rows"], data["picks"], data["train"]
    for r in raw:  # json keys are strings
        for key in ("exact", "auto"):
            r[key]["speed"] = {int(b): v for b, v in r[key]["speed"].items()}
    ref_flops, ref_acc = data["reference"]["flops"], data["reference"]["acc"]
    partial = "" if len(raw) == data["picks_total"] else f" (run cut short: {len(raw)} of {data['picks_total']} picks)"
    header = ["pick"]
    for key in ("exact ranks", "auto"):
        header += [f"FLOP red. ({key})", f"speed-up @1 ({key})", f"speed-up @32 ({key})",
                   f"share @1 ({key})", f"share @32 ({key})", f"acc before FT ({key})"]
    header.append("auto changed")
    text = (
        f"Reference: ResNet-18-CIFAR trained {train_info['epochs']} epoch on {train_info['images']:,} images "
        f"of batches 1-4 ({train_info['cpu_s']:.0f} s CPU), {ref_flops:,} FLOPs, accuracy {ref_acc:.4f} on the "
        f"first {data['val']:,} images of batch 5 (in its ONNX file). rank_multiple auto on this CPU = {data['auto']}. "
        f"ONNX Runtime 1 thread, {data['rounds']} interleaved rounds at batch 1 ({max(5, data['rounds'] * 2 // 3)} "
        f"at 32), process CPU time, medians. share = speed-up / FLOP reduction. CPU time of the run "
        f"{data['cpu_s']:.0f} s{partial}; load average (1 min) at start {data['load_start']:.2f}, at the last pick "
        f"{data['load_now']:.2f} "
        f"(2 cores shared by six engineers).\n\n" + markdown_table(header, rows)
    )
    text += "\n\n" + summary(raw, ref_flops)
    report("Alignment by default: realized share of the FLOP cut in ONNX Runtime (ResNet-18-CIFAR)", text, write,
           data.get("command"))


if __name__ == "__main__":
    raise SystemExit(main())
