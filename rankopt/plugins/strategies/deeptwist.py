"""DeepTwist: train the full model and distort its weights onto the low-rank set every S_D steps.

After Lee et al., "Learning Low-Rank Approximation for CNNs" (``seeds/002_*``): train
the uncompressed model; every ``S_D`` steps (batches) replace each target kernel K by
its low-rank reconstruction K' (the trial decomposer's ``project`` at the layer's
ranks; Tucker-2 by default, or 2-D SVD of the lowered kernel with the ``svd``
decomposer); go on training from K'. Training so finds a flat minimum that the
low-rank approximation barely disturbs. After training the model is compressed
and its kernels are replaced by the compressed layers' own reconstructions (the last
distortion uses the very factors the compressed model keeps), so the compressed model
computes exactly what the trained model computes, for every decomposer: re-projecting a
projection is not the identity for CP-ALS (a local optimum, ``projection_idempotent``
False), so projecting and then decomposing again would move the weights. An optional
fine-tuning of the compressed model comes last.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.strategies._common import (
    DISTILL_DEFAULTS,
    check_bool,
    check_int,
    check_number,
    distill_params,
    spec_layers,
)
from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome
from rankopt.core.records import StrategyInfo

__all__ = ["DeepTwistStrategy", "adopt_compressed", "check_reconstructable", "distort", "scaled_distortion_steps"]

# seed 002: "S_D falls in the range of 100 to 5000 steps" (its CIFAR-10 runs use 200)
PAPER_DISTORTION_STEPS = (100, 5000)


def scaled_distortion_steps(distortion_steps: int, total_steps: int | None) -> int:
    """S_D for a run of ``total_steps``: at most half of them, so that at least two
    distortions happen during training (the paper's 100-5000 steps are CIFAR-10/ImageNet
    runs of tens of thousands of steps; a short trial on a small data set would otherwise
    distort once, at the end, which is plain training then projection)."""
    if total_steps is None or total_steps < 2:
        return distortion_steps
    return max(1, min(distortion_steps, total_steps // 2))


@torch.no_grad()
def distort(model: nn.Module, spec: Mapping[str, Mapping[str, Any]]) -> None:
    """Replace each spec layer's weight in place by its projection at the spec's ranks."""
    for _name, module, dec, ranks, options in spec_layers(model, spec):
        weight = module.weight
        weight.copy_(dec.project(weight.detach(), ranks, options).to(weight.dtype))


@torch.no_grad()
def adopt_compressed(model: nn.Module, compressed: nn.Module, spec: Mapping[str, Any]) -> None:
    """Set each spec layer's kernel of ``model`` to the one its compressed layer computes.

    The final distortion: afterwards ``model`` and ``compressed`` compute the same function
    whatever the decomposer (a second decomposition of a projected kernel need not return
    it, see the module docstring). Needs ``reconstruct_weight()`` on the built modules, as
    every built-in decomposer and the tensor_ring contrib provide.
    """
    for name in spec:
        built = compressed.get_submodule(name)
        _require_reconstruct(built, name, spec[name]["decomposer"])
        weight = model.get_submodule(name).weight
        weight.copy_(built.reconstruct_weight().detach().reshape(weight.shape).to(weight.dtype))


def _require_reconstruct(built: nn.Module, name: str, decomposer: str) -> None:
    if not callable(getattr(built, "reconstruct_weight", None)):
        raise ConfigError(
            f"deeptwist: the {type(built).__name__} that decomposer {decomposer!r} builds for "
            f"layer {name!r} has no reconstruct_weight(), so the trained model cannot be made "
            "equal to the compressed one; give the module a reconstruct_weight() or use "
            "another decomposer"
        )


def check_reconstructable(model: nn.Module, spec: Mapping[str, Any]) -> None:
    """Before training: every spec layer's factorized module offers ``reconstruct_weight()``."""
    for name, module, dec, ranks, options in spec_layers(model, spec):
        _require_reconstruct(dec.build(module, ranks, options=options, initialize=False), name, dec.name)


class DeepTwistStrategy(Strategy):
    """Weight distortion every ``distortion_steps`` steps (DeepTwist), then lossless compression.

    Hyperparameters:
        distortion_steps: S_D, the optimizer steps between two distortions. The paper
            uses 100 to 5000 (its CIFAR-10 runs 200): the default space searches 100-5000
            (log), the default is 200. Scaled to the data set by one rule
            (:func:`scaled_distortion_steps`): S_D is at most half the run's steps
            (epochs x batches per epoch), so every run distorts at least twice; the
            trial reports the S_D it used (``distortion_steps_used``). Large S_D lets
            training settle near a flat minimum, too large leaves few chances to escape
            a sharp one.
        epochs: training epochs of the full model with distortions.
        lr: learning rate of training and fine-tuning.
        finetune_epochs: fine-tuning of the compressed model after the last distortion
            (0, the default, keeps exactly the distorted weights).
        reselect: False (default) selects the ranks once, on the reference, and
            projects at those ranks every time, as the paper does. True re-selects them
            from the current weights at each distortion; with a threshold selector the
            ranks then only shrink, since each projection cuts the tail of the spectrum
            the next selection measures.

    ``preset: paper``: the paper's recipe, plain cross-entropy, no fine-tuning, S_D and
    lr searched in the paper's range. What the default adds: distillation in the
    (optional, off by default) fine-tuning; nothing else (docs/methods.md).
    """

    name = "deeptwist"
    description = "DeepTwist: project the weights onto the low-rank set every S_D steps while training"

    def search_space(self) -> dict[str, BaseDistribution]:
        return {
            "distortion_steps": IntDistribution(*PAPER_DISTORTION_STEPS, log=True),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    def paper_preset(self) -> dict[str, Any]:
        # seed 002: plain training with distortions, no fine-tuning, no distillation
        return {"finetune_epochs": 0.0, "reselect": False, "distill_weight": 0.0, "distill_features": 0.0}

    def paper_search_space(self) -> dict[str, BaseDistribution]:
        return {
            "distortion_steps": IntDistribution(*PAPER_DISTORTION_STEPS, log=True),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    def defaults(self) -> dict[str, Any]:
        return {
            "distortion_steps": 200,
            "epochs": 2.0,
            "lr": 0.01,
            "finetune_epochs": 0.0,
            "reselect": False,
            **DISTILL_DEFAULTS,
        }

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        hp = super().validate_params(params)
        return {
            "distortion_steps": check_int(self.name, "distortion_steps", hp["distortion_steps"], low=1),
            "epochs": check_number(self.name, "epochs", hp["epochs"], low=0.0),
            "lr": check_number(self.name, "lr", hp["lr"], low=0.0, low_open=True),
            "finetune_epochs": check_number(
                self.name, "finetune_epochs", hp["finetune_epochs"], low=0.0
            ),
            "reselect": check_bool(self.name, "reselect", hp["reselect"]),
            **distill_params(self.name, hp),
        }

    def run(self, ctx: TrialContext, params: Mapping[str, Any]) -> TrialOutcome:
        hp = self.validate_params(params)
        model = ctx.model()
        spec = ctx.select_ranks(model)
        check_reconstructable(model, spec)  # refuse before training, not after
        distortions = 0
        last_distorted = 0
        per_epoch = getattr(ctx, "steps_per_epoch", None)
        total = None if per_epoch is None else max(1, round(hp["epochs"] * per_epoch))
        every = scaled_distortion_steps(hp["distortion_steps"], total)

        def on_step(net: nn.Module, step: int) -> None:
            nonlocal spec, distortions, last_distorted
            if step % every == 0:
                if hp["reselect"]:
                    spec = ctx.select_ranks(net)
                distort(net, spec)
                distortions += 1
                last_distorted = step

        extra: dict[str, Any] = {}
        steps = 0
        if hp["epochs"] > 0:
            steps = ctx.train(model, epochs=hp["epochs"], lr=hp["lr"], step_callback=on_step).steps
        if last_distorted != steps or distortions == 0:
            # the last steps since a distortion (or a run shorter than S_D) leave the
            # weights full-rank; one more distortion makes them low-rank
            extra["accuracy_before_last_distortion"] = ctx.evaluate(model)
            if hp["reselect"]:
                spec = ctx.select_ranks(model)
            distortions += 1
        # the last distortion is the compression itself: the trained model takes the
        # compressed layers' kernels, so compressing loses nothing for any decomposer
        compressed = ctx.compress(model, spec)
        adopt_compressed(model, compressed, spec)
        extra["accuracy_before_compression"] = ctx.evaluate(model)
        extra["accuracy_after_compression"] = ctx.evaluate(compressed)
        extra["distortions"] = distortions
        extra["distortion_steps_used"] = every
        if hp["finetune_epochs"] > 0:
            ctx.train(compressed, epochs=hp["finetune_epochs"], lr=hp["lr"], **distill_params(self.name, hp))
        ctx.report(
            deeptwist_distortions=distortions,
            deeptwist_ranks={name: list(entry["ranks"]) for name, entry in spec.items()},
        )
        return TrialOutcome(model=compressed, spec=spec, extra=extra)


@hookimpl
def rankopt_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("deeptwist", DeepTwistStrategy, DeepTwistStrategy.description)]
