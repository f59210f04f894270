"""Shared pieces of the issue-8 benchmarks: the two settings (LeNet-5 on MNIST, ResNet-20
on a CIFAR-10 subset), the shared trained reference, the study configs of rankopt's search
and of the methods users run by hand, and the figures that compare their fronts.

Every method is run as a rankopt study from the same reference weights
(``reference.weights``) with the same fine-tuning (``finetune`` strategy, same epochs
and learning rate), so the fronts differ only in how the ranks were chosen:

- ``rankopt``: multi-objective TPE (``multivariate``, ``group``) over energy / per-layer
  fraction / VBMF / budget (params or FLOPs) selectors and Tucker-2 or SVD per conv,
  seeded with the selectors' one-shot proposals and the uniform rate sweep 4-64x with
  the classifier full (``seed_proposals``, :func:`rankopt.search.seeding.uniform_proposals`)
  and the VBMF sweep (:func:`rankopt.search.seeding.anchored_proposals`), N trials, with
  the study defaults (distillation; ``multi_fidelity: auto``: every trial half the
  epochs, the better half the full epochs more);
- ``rankopt_nsgaii``: the same with the default sampler, NSGA-II. Optuna's NSGA-II
  evolves only the parameters every trial has (its intersection search space), so the
  search space asks every selector's and strategy's parameters in every trial (a trial
  uses its chosen methods' ones); before that change they were drawn at random;
- ``vbmf``: VBMF ranks once (Tucker-2 on convs, SVD on linears);
- ``energy``: energy threshold p in {0.80, 0.85, 0.90, 0.92, 0.95, 0.98};
- ``fraction``: one rank fraction for all layers in {0.1, 0.2, 0.3, 0.5, 0.7};
- ``uniform``: every layer's parameters cut by one rate in {4, 8, 16, 32, 64}x (per-layer
  fractions of the ``fixed`` selector, :func:`rankopt.search.seeding.uniform_rate_point`),
  the thin first conv dense (``targets.dense_input_channels``, on by default);
- ``uniform_head``: the same with the classifier (the last target layer) dense too: at
  8x and beyond a 10-class classifier would be cut to rank 1;
- ``random``: random search over rankopt's space, N trials, no seeding;
- ``rankopt_screened``: ``rankopt`` whose first points come from ``screening``, the
  no-fine-tune proxy (``Setting.screening`` candidates, ``population`` kept); its
  screening time is counted in its time;
- ``rankopt_full``: ``rankopt`` with ``targets.allow_full`` (each layer may also stay
  uncompressed, a per-layer choice the sampler learns);
- ``rankopt_full_screened``: both ``allow_full`` and ``screening``;
- ``rankopt_kd``: ``rankopt`` whose fine-tuning distills the reference (``KD``, the
  strategies' default since this benchmark: ``rankopt`` is the same study);
- ``rankopt_nomf``: ``rankopt`` with multi-fidelity off (``multi_fidelity: null``; the
  default before ``multi_fidelity: auto``): every trial fine-tunes the full epochs;
- ``rankopt_nokd``: ``rankopt`` with distillation off (``distill_weight: 0``, the default
  before);
- ``rankopt_mf``: ``rankopt`` with multi-fidelity at the same fine-tuning epochs: every
  trial fine-tunes half the epochs, then the best quarter by non-dominated rank gets
  2x the setting's epochs more (N/2 + N/4 * 2 = N epochs, as ``rankopt``'s N);
- ``rankopt_kd_mf``: both;
- ``rankopt_all``: ``rankopt_screened`` with distillation and multi-fidelity;
- ``rankopt_all_wide``: ``rankopt_all`` whose multi-fidelity continues half the models
  (not a quarter) by the setting's epochs (not twice them): the same epochs in all;
- ``rankopt_kd_mf_wide``: ``rankopt_all_wide`` without screening;
- ``rankopt_kd_mf_deep``: multi-fidelity in two rounds at the same epochs: every trial a
  third of the setting's epochs, the better half 8/9 of them more, the better half of those
  8/9 more again (N/3 + N/2 * 8/9 + N/4 * 8/9 = N), so the best quarter gets 2.1x;
- ``rankopt_fast``: ``rankopt`` with ``keep_faster_layers`` (a decomposed layer that
  measures slower than its original on this machine stays full), for the realized-speed
  benchmark.

The searches take a seed (``--seeds``): the sampler's. Seed 0 runs in ``<method>/``, seed
s in ``<method>_s<s>/``. The hand methods do not depend on it and run once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _record import markdown_table  # noqa: E402,F401  (re-exported for the bench scripts)

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()

ENERGY_PS = (0.80, 0.85, 0.90, 0.92, 0.95, 0.98)
FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7)
UNIFORM_RATES = (4, 8, 16, 32, 64)
# the searches (run once per --seeds value) and the hand methods (deterministic, run once)
SEARCH_METHODS = ("rankopt", "rankopt_screened", "random", "rankopt_nsgaii", "rankopt_fast",
                  "rankopt_full", "rankopt_full_screened", "rankopt_kd", "rankopt_mf", "rankopt_kd_mf",
                  "rankopt_all", "rankopt_all_wide", "rankopt_kd_mf_wide", "rankopt_nokd",
                  "rankopt_kd_mf_deep", "rankopt_nomf")
HAND_METHODS = ("vbmf", "energy", "fraction", "uniform", "uniform_head")
METHODS = SEARCH_METHODS + HAND_METHODS
# variants of rankopt's own search, left out of the "every other method" comparisons
RANKOPT_VARIANTS = ("rankopt", "rankopt_screened", "rankopt_nsgaii", "rankopt_fast", "rankopt_full",
                    "rankopt_full_screened", "rankopt_kd", "rankopt_mf", "rankopt_kd_mf", "rankopt_all",
                    "rankopt_all_wide", "rankopt_kd_mf_wide", "rankopt_nokd", "rankopt_kd_mf_deep",
                    "rankopt_nomf")
# distillation of the issue-18 variants: lambda 0.5 at T = 4 (Hinton et al.'s range)
KD = {"distill_weight": 0.5, "distill_temperature": 4.0}


@dataclass(frozen=True)
class Setting:
    """One model + data pair and the training budget every method gets."""

    key: str
    title: str
    model: dict[str, Any]
    data: dict[str, Any]  # npz dataset kwargs
    files: tuple[str, ...]  # archives that must exist under DATA
    batch_size: int
    reference_epochs: float
    reference_lr: float
    finetune_epochs: float
    finetune_lr: float
    trials: int  # N for rankopt's search and for random search
    population: int  # NSGA-II population size
    seed_points: int  # seed_proposals: spread points per selector
    screening: int  # rankopt_screened: candidates tried without training
    weights: Path | None = None  # a committed, fully trained reference (else trained here)

    def describe(self) -> str:
        limit = self.data.get("limit", {})
        return (
            f"{self.title}: {limit.get('train', 'all')} training / {limit.get('val', 'all')} "
            f"validation images, reference {self.reference_epochs:g} epochs, fine-tuning "
            f"{self.finetune_epochs:g} epoch(s) at lr {self.finetune_lr:g} for every method, "
            f"N = {self.trials} trials"
        )


def settings(quick: bool) -> dict[str, Setting]:
    """The two settings; ``quick`` shrinks data, epochs and N to fit a 2-core CPU."""
    mnist_limit = {"train": 10000, "val": 2000} if quick else {}
    # the 1-point line needs a validation set whose sampling error is well under a point:
    # at 0.91 accuracy the standard error is 0.29 points on 10,000 images (batch 5) and
    # 0.40 on the quick 5,000; fine-tuning draws from the 40,000 images the reference saw
    cifar_limit = {"train": 10000, "val": 5000} if quick else {}
    mnist = Setting(
        key="mnist",
        title="LeNet-5 (Caffe variant) on MNIST",
        model={"name": "lenet5"},
        data={"train": "mnist_train.npz", "val": "mnist_test.npz", "root": str(DATA),
              "mean": 0.1307, "std": 0.3081, **({"limit": mnist_limit} if quick else {})},
        files=("mnist_train.npz", "mnist_test.npz"),
        batch_size=64,
        reference_epochs=4 if quick else 10,
        reference_lr=0.05,
        finetune_epochs=1,
        finetune_lr=0.01,
        trials=24 if quick else 48,
        population=8 if quick else 12,
        seed_points=1 if quick else 3,
        screening=100 if quick else 200,
    )
    cifar = Setting(
        key="cifar",
        title="ResNet-20 on CIFAR-10 (committed reference 0.912; batches 1-4 train, batch 5 validation)",
        model={"name": "resnet20_cifar"},
        data={"train": [f"cifar10_train_{k}.npz" for k in (1, 2, 3, 4)], "val": "cifar10_train_5.npz",
              "root": str(DATA), "mean": [0.4914, 0.4822, 0.4465], "std": [0.2470, 0.2435, 0.2616],
              "augment": True, **({"limit": cifar_limit} if quick else {})},
        files=tuple(f"cifar10_train_{k}.npz" for k in (1, 2, 3, 4, 5)),
        batch_size=64 if quick else 128,
        reference_epochs=40,  # the committed weights (not trained here)
        reference_lr=0.1,
        finetune_epochs=2 if quick else 5,
        finetune_lr=0.01,
        trials=12 if quick else 48,
        population=6 if quick else 12,
        seed_points=0 if quick else 3,  # quick: only the selectors' defaults, N is small
        screening=60 if quick else 200,
        # benchmarks/train_reference_cifar.py made it (and checks it): 40 epochs on batches 1-4
        weights=ROOT / "benchmarks" / "references" / "resnet20_cifar10.pt",
    )
    return {"mnist": mnist, "cifar": cifar}


def missing_data(setting: Setting) -> list[str]:
    """Archives of ``setting`` absent from ``../shared/data``."""
    return [f for f in setting.files if not (DATA / f).is_file()]


# -- the shared reference ------------------------------------------------------------------


def reference_weights(setting: Setting, out: Path, device: str) -> Path:
    """Train the setting's reference once (seed 0) and save its state_dict; reused if present."""
    import torch

    import rankopt
    from rankopt.training.devices import resolve_device
    from rankopt.training.loop import make_loader, seed_everything, train

    if setting.weights is not None:
        return setting.weights
    path = out / setting.key / "reference.pt"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    splits = rankopt.dataset("npz", **setting.data)
    seed_everything(0)
    model = rankopt.model(setting.model["name"], num_classes=splits.num_classes,
                          in_channels=splits.input_shape[0])
    loader = make_loader(splits.train, batch_size=setting.batch_size, shuffle=True, seed=0)
    train(model, loader, epochs=setting.reference_epochs, lr=setting.reference_lr, seed=0,
          device=resolve_device(device))
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return path


# -- study configs ----------------------------------------------------------------------------


def run_name(method: str, seed: int = 0) -> str:
    """The run folder (and study name suffix) of ``method`` at sampler seed ``seed``."""
    return method if seed == 0 or method in HAND_METHODS else f"{method}_s{seed}"


def _base(setting: Setting, method: str, weights: Path, out: Path, device: str,
          seed: int = 0) -> dict[str, Any]:
    name = run_name(method, seed)
    return {
        "name": f"{setting.key}_{name}",
        "model": dict(setting.model),
        "data": {"name": "npz", "kwargs": dict(setting.data), "batch_size": setting.batch_size},
        "reference": {"weights": str(weights)},
        "decomposers": ["tucker2", "svd"],
        "strategies": {"finetune": {"epochs": setting.finetune_epochs, "lr": setting.finetune_lr}},
        "objectives": ["accuracy", "params", "flops"],
        "device": device,
        "seed": 0,
        "run_dir": str(out / setting.key / name),
    }


def _hand_space(config: dict[str, Any]) -> tuple[Any, Any]:
    """The search space of a hand method's study and its (untrained) model; the targets
    are the study's, thin first convs left out as the study leaves them."""
    import rankopt
    from rankopt.config.schema import load_config
    from rankopt.search.space import SearchSpace
    from rankopt.search.building import thin_conv

    cfg = load_config(config)
    in_ch = 1 if cfg.model and cfg.model.name == "lenet5" else 3
    side = 28 if in_ch == 1 else 32
    model = rankopt.model(cfg.model.name, num_classes=10, in_channels=in_ch)  # type: ignore[union-attr]
    targets = [t for t in rankopt.find_layers(model, (1, in_ch, side, side), include=cfg.targets.include,
                                              exclude=cfg.targets.exclude)
               if not thin_conv(model, t.name, cfg.targets.dense_input_channels)]
    return SearchSpace(cfg, model, targets), model


def _hand_decomposers(config: dict[str, Any]) -> dict[str, str]:
    """``decomposer.<layer>: tucker2`` for every conv that could also take SVD: the hand
    recipe (Tucker-2 on convs, SVD on linears)."""
    space, _ = _hand_space(config)
    return {f"decomposer.{layer}": "tucker2" for layer, options in space.layer_options.items()
            if len(options) > 1 and "tucker2" in options}


def uniform_points(config: dict[str, Any], rates: Sequence[float] = UNIFORM_RATES) -> list[dict[str, Any]]:
    """The uniform rate sweep's points: per-layer fractions cutting each layer by each rate
    (shapes only matter, so an untrained model of the same architecture serves)."""
    from rankopt.search.seeding import uniform_rate_point

    space, model = _hand_space(config)
    hand = {layer: ("tucker2" if "tucker2" in options else options[0])
            for layer, options in space.layer_options.items()}
    return [uniform_rate_point(space, model, rate, hand) for rate in rates]


def search_space_config(setting: Setting) -> dict[str, Any]:
    """Selectors of rankopt's search (and of random search over the same space)."""
    return {
        # down to 64x and beyond per layer (rank 1: fixed's default range starts at 0.001)
        "energy": {"p": {"low": 0.3, "high": 0.995}},
        "fixed": {"space": {"per_layer": True}},
        "vbmf": {},
        "budget": {"target": {"low": 0.005, "high": 0.9, "log": True},
                   "measure": {"choices": ["params", "flops"]}},
    }


def method_config(setting: Setting, method: str, weights: Path, out: Path, device: str,
                  seed: int = 0) -> dict[str, Any]:
    """The study of ``method`` on ``setting``; ``seed`` is the searches' sampler seed."""
    cfg = _base(setting, method, weights, out, device, seed)
    if method in SEARCH_METHODS:
        cfg["selectors"] = search_space_config(setting)
        cfg["trials"] = setting.trials
        if method.startswith("rankopt") and method != "rankopt_nsgaii":
            cfg["sampler"] = {"name": "tpe", "seed": seed,
                              "options": {"multivariate": True, "group": True,
                                          "n_startup_trials": setting.population}}
            cfg["seed_proposals"] = setting.seed_points
            cfg["keep_faster_layers"] = method == "rankopt_fast"
            if method.endswith("_screened") or method.startswith("rankopt_all"):
                cfg["screening"] = {"candidates": setting.screening, "keep": setting.population}
            if method.startswith("rankopt_full"):
                cfg["targets"] = {"allow_full": True}
            if method in ("rankopt_kd", "rankopt_kd_mf", "rankopt_all", "rankopt_all_wide", "rankopt_kd_mf_wide"):
                cfg["strategies"]["finetune"].update(KD)
            if method in ("rankopt_mf", "rankopt_kd_mf", "rankopt_all"):
                cfg["strategies"]["finetune"]["epochs"] = setting.finetune_epochs / 2
                cfg["multi_fidelity"] = {"rounds": 1, "epochs": 2 * setting.finetune_epochs,
                                         "keep": 0.25}
            if method == "rankopt_nokd":  # the default without distillation (the ablation)
                cfg["strategies"]["finetune"]["distill_weight"] = 0.0
            if method == "rankopt_nomf":  # the default without multi-fidelity (the ablation)
                cfg["multi_fidelity"] = None
            if method in ("rankopt_all_wide", "rankopt_kd_mf_wide"):  # the same epochs, twice the models
                cfg["strategies"]["finetune"]["epochs"] = setting.finetune_epochs / 2
                cfg["multi_fidelity"] = {"rounds": 1, "epochs": setting.finetune_epochs, "keep": 0.5}
            if method == "rankopt_kd_mf_deep":  # two rounds: the best quarter gets 2.1x the epochs
                # N/3 + (N/2 + N/4) * 8/9 = N epochs in units of the setting's epochs
                cfg["strategies"]["finetune"]["epochs"] = setting.finetune_epochs / 3
                cfg["multi_fidelity"] = {"rounds": 2, "epochs": setting.finetune_epochs * 8 / 9,
                                         "keep": 0.5}
        elif method == "rankopt_nsgaii":
            cfg["sampler"] = {"name": "nsgaii", "seed": seed,
                              "options": {"population_size": setting.population}}
            cfg["seed_proposals"] = setting.seed_points
        else:
            cfg["sampler"] = {"name": "random", "seed": seed}
        return cfg
    cfg["sampler"] = {"name": "random", "seed": 0}
    if method == "vbmf":
        cfg["selectors"] = {"vbmf": {"weakening": 0.0}}
        cfg["enqueue"] = [{}]
    elif method == "energy":
        cfg["selectors"] = {"energy": {"p": {"low": min(ENERGY_PS), "high": max(ENERGY_PS)}}}
        cfg["enqueue"] = [{"energy.p": p} for p in ENERGY_PS]
    elif method == "fraction":
        cfg["selectors"] = {"fixed": {"fraction": {"low": min(FRACTIONS), "high": max(FRACTIONS)}}}
        cfg["enqueue"] = [{"fixed.fraction": f} for f in FRACTIONS]
    elif method in ("uniform", "uniform_head"):
        cfg["selectors"] = {"fixed": {"space": {"per_layer": True}}}
        if method == "uniform_head":
            space, _ = _hand_space(cfg)
            cfg["targets"] = {"exclude": [list(space.layer_options)[-1]]}
        cfg["enqueue"] = uniform_points(cfg)
    else:
        raise ValueError(f"unknown method {method!r}; methods are {list(METHODS)}")
    hand = _hand_decomposers(cfg)
    cfg["enqueue"] = [{**point, **hand} for point in cfg["enqueue"]]
    cfg["trials"] = len(cfg["enqueue"])
    return cfg


# -- figures --------------------------------------------------------------------------------------


@dataclass
class MethodFigures:
    """What the front-quality table shows for one method."""

    method: str
    trials: int
    hv_params: float
    hv_flops: float
    best_params: int | None  # fewest params within 1 point of the reference accuracy
    best_params_trial: int | None
    best_flops: int | None
    best_flops_trial: int | None
    seconds: float
    epochs: float = 0.0  # training epochs all its trials ran
    epochs_to_hv: float | None = None  # epochs until HV (acc, params) was within 1 % of its final
    repeats: int = 0


def figures(method: str, records: Sequence[Any], baseline: dict[str, Any], seconds: float,
            tolerance: float = 0.01) -> MethodFigures:
    """Hypervolumes (normalized by the baseline) and the cheapest models within ``tolerance``."""
    from rankopt.results.reading import hypervolume_2d

    spent = sum(getattr(r, "train_epochs", 0.0) for r in records)
    repeats = sum(getattr(r, "repeat_of", None) is not None for r in records)
    # each model once, at the highest fidelity it reached (as StudyResult.front does)
    superseded = {getattr(r, "continued_from", None) for r in records}
    history = list(records)
    records = [r for r in records if getattr(r, "repeat_of", None) is None and r.trial not in superseded]
    hv_p = hypervolume_2d([(r.accuracy, r.params) for r in records], float(baseline["params"]))
    hv_f = hypervolume_2d([(r.accuracy, r.flops) for r in records], float(baseline["flops"]))
    ok = [r for r in records if r.accuracy >= baseline["accuracy"] - tolerance]
    bp = min(ok, key=lambda r: (r.params, -r.accuracy)) if ok else None
    bf = min(ok, key=lambda r: (r.flops, -r.accuracy)) if ok else None
    to_hv = None
    epochs = 0.0
    for i, r in enumerate(history):  # in trial order: the front of the trials so far
        epochs += getattr(r, "train_epochs", 0.0)
        done = history[: i + 1]
        later = {getattr(d, "continued_from", None) for d in done}
        pts = [(d.accuracy, d.params) for d in done
               if getattr(d, "repeat_of", None) is None and d.trial not in later]
        if hypervolume_2d(pts, float(baseline["params"])) >= 0.99 * hv_p:
            to_hv = epochs
            break
    return MethodFigures(method, len(history), hv_p, hv_f, bp.params if bp else None,
                         bp.trial if bp else None, bf.flops if bf else None,
                         bf.trial if bf else None, seconds, spent, to_hv, repeats)


def run_method(config: dict[str, Any]) -> tuple[Any, float]:
    """Run (or continue) one method's study; returns its StudyResult and its trials' seconds."""
    import rankopt

    result = rankopt.run_study(config, progress=False)
    # trial time from the storage, so a rerun that reuses completed trials reports the same
    spent = sum((t.datetime_complete - t.datetime_start).total_seconds()
                for t in result.study.trials if t.datetime_complete and t.datetime_start)
    screening = Path(config["run_dir"]) / "screening.json"
    if screening.is_file():  # the proxy's time is part of the search's budget
        spent += float(json.loads(screening.read_text())["seconds"])
    return result, spent


def picked_models(out: Path, key: str) -> dict[str, Any]:
    """The models the front-quality run picked for ``key`` (written to ``picked.json``)."""
    path = out / key / "picked.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; run benchmarks/bench_front_quality.py with the same --out first"
        )
    return json.loads(path.read_text())  # type: ignore[no-any-return]
