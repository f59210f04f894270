"""TDLRT: train the conv layers directly in Tucker format, learning their ranks as it trains.

After Zangrando et al., "Rank-adaptive spectral pruning of convolutional layers
during training" (``seeds/003_*``): every target Conv2d becomes a Tucker-2 layer
``W = C x_0 U_out x_1 U_in`` whose factors move by the rank-adaptive integrator
(basis augmentation with the gradient directions, core update in the augmented
bases, truncation at relative tolerance ``tau``; see
:mod:`rankopt.plugins.strategies._tdlrt_layers`) after each optimizer step. The
ranks are an output: the trial reports them, and the trained layers become the
modules the ``tucker2`` decomposer builds at those ranks, so the result is an
ordinary compressed model (``tucker2`` spec plus state_dict) that ``pick`` and
:func:`rankopt.load_compressed` handle.

Choices the paper leaves open, made here:

* Starting point: ``init="reference"`` (default) starts from the Tucker-2
  decomposition of the trained reference at the initial ranks, as every other
  strategy of a study does; ``init="random"`` starts from random orthonormal bases
  and a random core, as the paper trains from scratch.
* Training in factored form (the paper's point): each layer's forward and backward
  run through its three factor convolutions (1x1 by ``U_in^T``, the kh x kw core, 1x1 by
  ``U_out``); the backward yields the K-, L- and S-step gradients at factor size and the
  full kernel is never built (:mod:`rankopt.plugins.strategies._tdlrt_factored`). The
  factors take the paper's descent step, plain SGD at the loop's current learning rate
  (its schedule included, read from the loop's optimizer after each step); the loop's
  momentum, weight decay and gradient clipping act on the other parameters (biases,
  dense layers, batch norm). On 256->256 3x3 at ranks 32/32 a training step takes 0.38x
  the time of dense training and the layer holds 0.05x its bytes (benchmarks/bench_tdlrt.py).
* Rank growth follows the paper's integrator: the bases are augmented with the K- and
  L-step descent directions and the augmented core truncated at ``tau * ||C~||_F`` (as in
  the paper and its authors' code). A rank therefore grows only while one step's new
  directions carry more than that: a rank-2 layer that needs rank 16 reaches it at tau
  0.1 with steps that remove 25% of the error, but stays at 2 with steps that remove 3%
  (the K/L gradients vanish once the layer fits what its rank can: the rest of the
  gradient lies outside the tangent space, where the integrator does not look).
  ``carry_truncated=True`` keeps the cut part in a dense pending update (the kernel
  path: reconstructed kernel plus a full-size ``delta`` the loop's optimizer steps, so
  dense memory and compute), so directions the gradient keeps pushing accumulate until
  they pass ``tau`` (rank 2 -> 16 at tau 0.1 even with small steps). Not the default:
  from a trained reference it also keeps every rank the reference has (small_cnn on
  digits at tau 0.1: no layer saved parameters), and the remainder is dropped when the
  layer becomes a ``tucker2`` module.
* ``preset: paper``: ``init="random"`` (training from scratch), the paper's integrator,
  no fine-tuning; ``tau`` and ``lr`` searched. TDLRT never distills. What the default
  adds: the reference start (a study compresses a trained model; docs/methods.md).
* Only Conv2d targets the ``tucker2`` decomposer supports are trained in Tucker
  format; other targets (Linear layers) stay dense and train normally. The trial's
  rank selector and decomposer choice are not used: the ranks come from ``tau``.
* A layer whose learned ranks would not save parameters (e.g. a first conv with 1
  or 3 input channels) is stored as a plain Conv2d holding the learned kernel, and
  left out of the spec.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from optuna.distributions import BaseDistribution, FloatDistribution

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.strategies._common import check_bool, check_choice, check_int, check_number
from rankopt.plugins.strategies._tdlrt_layers import TuckerTrainingConv2d, tucker2_convs
from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome
from rankopt.core.records import StrategyInfo
from rankopt.compression.surgery import set_submodule

__all__ = ["TDLRTStrategy"]

INITS = ("reference", "random")


def _initial_layer(
    conv: nn.Conv2d, ranks: tuple[int, int], max_ranks: tuple[int, int], min_rank: int, init: str,
    factored: bool,
) -> TuckerTrainingConv2d:
    from rankopt.contract.manager import get_registry

    r_in, r_out = ranks
    if init == "reference":
        built = get_registry().create("decomposers", "tucker2").build(conv, ranks)
        first, middle, last = tucker2_convs(built)
        u_in = first.weight.detach().reshape(r_in, conv.in_channels).T
        u_out = last.weight.detach().reshape(conv.out_channels, r_out)
        core = middle.weight.detach()
        bias = last.bias.detach() if last.bias is not None else None
    else:
        weight = conv.weight
        u_in = torch.randn(conv.in_channels, r_in, device=weight.device, dtype=weight.dtype)
        u_out = torch.randn(conv.out_channels, r_out, device=weight.device, dtype=weight.dtype)
        u_in, u_out = torch.linalg.qr(u_in)[0], torch.linalg.qr(u_out)[0]
        # Kaiming-normal kernel variance 2 / fan_in with orthonormal bases: each core entry
        # spreads over T*S/(r_out*r_in) kernel entries
        fan_in = conv.in_channels * math.prod(conv.kernel_size)
        std = math.sqrt(2.0 / fan_in * conv.out_channels * conv.in_channels / (r_out * r_in))
        core = torch.randn(r_out, r_in, *conv.kernel_size, device=weight.device, dtype=weight.dtype)
        core = core * std
        bias = torch.zeros_like(conv.bias) if conv.bias is not None else None
    return TuckerTrainingConv2d.from_factors(
        conv, core, u_out, u_in, bias, max_ranks=max_ranks, min_rank=min_rank, factored=factored
    )


@contextmanager
def _loop_learning_rate() -> Iterator[list[float]]:
    """``[lr]``: the learning rate of the last optimizer step taken while inside.

    The factored layers take the paper's plain descent step at the loop's current rate
    (its schedule included); the loop's optimizer is not reachable from a step
    callback, so a global post-step hook reads it (removed on exit).
    """
    from torch.optim.optimizer import register_optimizer_step_post_hook

    current = [math.nan]

    def read(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        current[0] = float(optimizer.param_groups[0]["lr"])

    handle = register_optimizer_step_post_hook(read)
    try:
        yield current
    finally:
        handle.remove()


class TDLRTStrategy(Strategy):
    """Rank-adaptive training in Tucker-2 format (TDLRT); the learned ranks are its output.

    Hyperparameters:
        tau: relative truncation tolerance; per mode, the discarded singular values of
            the core unfolding have norm at most ``tau * ||core||_F``. Larger: lower ranks.
            The truncation repeats after every step, relative to the current norm, so a
            mode settles where each kept singular value exceeds ``tau * ||core||_F``
            (a smaller one is a small enough tail by itself); useful values are about
            0.01 to 0.3.
        epochs: training epochs in Tucker format.
        lr: learning rate.
        initial_rank_fraction: the starting ranks as a fraction of each mode's largest
            rank (rounded up). The default 1.0 starts from the exact Tucker form of the
            reference and lets the truncation find the ranks; a rank grows (up to
            doubling per step) only when the update's new directions carry more than
            the tolerance, which small learning rates rarely give. ``lr`` is the factors'
            plain SGD step size (no momentum), so it is larger than a momentum-SGD rate.
        min_rank: the smallest rank a mode may fall to.
        init: ``"reference"`` (decompose the trained reference) or ``"random"``.
        finetune_epochs: training of the converted model at fixed ranks (0 skips it).
    """

    name = "tdlrt"
    description = "TDLRT: train convs in Tucker format with rank adaptation at tolerance tau"

    def search_space(self) -> dict[str, BaseDistribution]:
        return {
            "tau": FloatDistribution(0.01, 0.5, log=True),
            "lr": FloatDistribution(1e-4, 1e-1, log=True),
        }

    def paper_preset(self) -> dict[str, Any]:
        # seed 003: training from scratch (random orthonormal bases), ranks from tau only
        return {"init": "random", "initial_rank_fraction": 1.0, "finetune_epochs": 0.0, "carry_truncated": False}

    def paper_search_space(self) -> dict[str, BaseDistribution]:
        return self.search_space()

    def defaults(self) -> dict[str, Any]:
        return {
            "tau": 0.1,
            "epochs": 2.0,
            "lr": 0.01,
            "initial_rank_fraction": 1.0,
            "min_rank": 1,
            "init": "reference",
            "finetune_epochs": 0.0,
            "carry_truncated": False,
        }

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        hp = super().validate_params(params)
        return {
            "tau": check_number(
                self.name, "tau", hp["tau"], low=0.0, high=1.0, low_open=True, high_open=True
            ),
            "epochs": check_number(self.name, "epochs", hp["epochs"], low=0.0),
            "lr": check_number(self.name, "lr", hp["lr"], low=0.0, low_open=True),
            "initial_rank_fraction": check_number(
                self.name, "initial_rank_fraction", hp["initial_rank_fraction"],
                low=0.0, high=1.0, low_open=True,
            ),
            "min_rank": check_int(self.name, "min_rank", hp["min_rank"], low=1),
            "init": check_choice(self.name, "init", hp["init"], INITS),
            "carry_truncated": check_bool(self.name, "carry_truncated", hp["carry_truncated"]),
            "finetune_epochs": check_number(
                self.name, "finetune_epochs", hp["finetune_epochs"], low=0.0
            ),
        }

    def run(self, ctx: TrialContext, params: Mapping[str, Any]) -> TrialOutcome:
        from rankopt.contract.manager import get_registry

        hp = self.validate_params(params)
        dec = get_registry().create("decomposers", "tucker2")
        model = ctx.model()
        layers: dict[str, tuple[nn.Conv2d, TuckerTrainingConv2d, Any]] = {}
        for info in ctx.targets:
            conv = model.get_submodule(info.name)
            if not isinstance(conv, nn.Conv2d) or not dec.supports(conv):
                continue
            largest = tuple(int(r) for r in dec.max_ranks(conv))
            start = tuple(
                min(hi, max(hp["min_rank"], math.ceil(hp["initial_rank_fraction"] * hi)))
                for hi in largest
            )
            layer = _initial_layer(
                conv, start, largest, hp["min_rank"], hp["init"],  # type: ignore[arg-type]
                factored=not hp["carry_truncated"],
            )
            set_submodule(model, info.name, layer)
            layers[info.name] = (conv, layer, info)
        if not layers:
            raise ConfigError(
                "strategy 'tdlrt' trains Conv2d layers in Tucker-2 format, but no target layer is "
                f"a Conv2d the tucker2 decomposer supports (targets: {[t.name for t in ctx.targets]}); "
                "include conv layers in the study's targets or choose another strategy"
            )

        history: list[dict[str, Any]] = [
            {"step": 0, "ranks": {n: list(lay.ranks) for n, (_, lay, _) in layers.items()}}
        ]

        loop_lr = [math.nan]

        def on_step(net: nn.Module, step: int) -> None:
            for _conv, layer, _info in layers.values():
                layer.integrate(hp["tau"], carry=hp["carry_truncated"], lr=loop_lr[0])
            ranks = {n: list(lay.ranks) for n, (_, lay, _) in layers.items()}
            if ranks != history[-1]["ranks"]:
                history.append({"step": step, "ranks": ranks})
                if len(history) > 1000:  # ranks that flicker at convergence: keep it small
                    del history[1::2]

        if hp["epochs"] > 0:
            options: dict[str, Any] = {}
            if (not hp["carry_truncated"] and torch.device(ctx.device).type == "cuda"
                    and not torch.cuda.is_bf16_supported()):
                # float16 AMP scales the loss by a factor the step callback cannot read, and
                # the factored layers' step gradients with it: train those runs in float32
                options["amp"] = False
            with _loop_learning_rate() as loop_lr:
                ctx.train(model, epochs=hp["epochs"], lr=hp["lr"], step_callback=on_step, **options)

        spec: dict[str, dict[str, Any]] = {}
        for name, (conv, layer, info) in layers.items():
            ranks = layer.ranks
            dense_params = sum(p.numel() for p in conv.parameters())
            # params do not depend on the input size; any will do where the target lacks it
            if dec.cost(conv, ranks, info.input_hw or (64, 64)).params < dense_params:
                set_submodule(model, name, layer.to_tucker2(conv))
                spec[name] = {"decomposer": "tucker2", "ranks": list(ranks)}
            else:
                set_submodule(model, name, layer.to_dense(conv))
        model.to(ctx.device)
        extra: dict[str, Any] = {"accuracy_after_compression": ctx.evaluate(model)}
        if hp["finetune_epochs"] > 0:
            ctx.train(model, epochs=hp["finetune_epochs"], lr=hp["lr"])
        learned = {name: list(layer.ranks) for name, (_, layer, _) in layers.items()}
        ctx.report(tdlrt_ranks=learned, tdlrt_rank_history=history)
        extra["tdlrt_ranks"] = learned
        return TrialOutcome(model=model, spec=spec, extra=extra)


@hookimpl
def rankopt_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("tdlrt", TDLRTStrategy, TDLRTStrategy.description)]
