"""The hook specifications of rankopt.

Plugins implement these with :data:`rankopt.hookimpl`. Built-in methods use the same
marker and hooks as third-party plugins. A third-party package exposes a module (or
object) in the ``rankopt`` entry-point group::

    [project.entry-points.rankopt]
    my_methods = "my_package.plugin"

The author's guide, ``docs/plugins.md``, has a complete plugin for every family and
shows how to check one with :mod:`rankopt.testing`. A plugin that fails to import,
raises inside a hook or returns an invalid record is reported (with its distribution
and version) by ``rankopt plugins``; the others keep working.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pluggy

from rankopt.core.records import (
    DatasetInfo,
    DecomposerInfo,
    ModelInfo,
    RankSelectorInfo,
    StrategyInfo,
)

PROJECT_NAME = "rankopt"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

__all__ = [
    "hookspec",
    "hookimpl",
    "rankopt_decomposers",
    "rankopt_rank_selectors",
    "rankopt_strategies",
    "rankopt_models",
    "rankopt_datasets",
    "rankopt_trial_finished",
    "rankopt_study_finished",
]


@hookspec
def rankopt_decomposers() -> Sequence[DecomposerInfo]:
    """Register decomposers (ways to factorize a layer).

    Example::

        from rankopt import Decomposer, DecomposerInfo, hookimpl

        class TensorRingDecomposer(Decomposer):
            name = "tensor_ring"
            ...

        @hookimpl
        def rankopt_decomposers():
            return [DecomposerInfo("tensor_ring", TensorRingDecomposer,
                                   "Tensor Ring conv (Wang et al., CVPR 2018)")]
    """


@hookspec
def rankopt_rank_selectors() -> Sequence[RankSelectorInfo]:
    """Register rank selectors (rules that turn a weight into ranks).

    Example::

        from rankopt import RankSelector, RankSelectorInfo, hookimpl

        class HalfRankSelector(RankSelector):
            name = "half"
            def select(self, module, decomposer, *, cache=None, name=None, options=None, **params):
                self.validate_params(params)  # unknown parameters fail, never dropped
                return tuple(max(1, r // 2) for r in decomposer.max_ranks(module, options))

        @hookimpl
        def rankopt_rank_selectors():
            return [RankSelectorInfo("half", HalfRankSelector, "Half of every rank")]
    """


@hookspec
def rankopt_strategies() -> Sequence[StrategyInfo]:
    """Register training strategies (how one trial trains, compresses and fine-tunes).

    Example::

        from rankopt import Strategy, StrategyInfo, TrialOutcome, hookimpl

        class CompressOnlyStrategy(Strategy):
            name = "compress_only"
            def run(self, ctx, params):
                model = ctx.model()
                spec = ctx.select_ranks(model)
                return TrialOutcome(model=ctx.compress(model, spec), spec=spec)

        @hookimpl
        def rankopt_strategies():
            return [StrategyInfo("compress_only", CompressOnlyStrategy,
                                 "Compress without any training")]
    """


@hookspec
def rankopt_models() -> Sequence[ModelInfo]:
    """Register model architectures that study files can name.

    Example::

        import torch.nn as nn
        from rankopt import ModelInfo, hookimpl

        def tiny_cnn(num_classes: int = 10) -> nn.Module:
            return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(),
                                 nn.LazyLinear(num_classes))

        @hookimpl
        def rankopt_models():
            return [ModelInfo("tiny_cnn", tiny_cnn, "An 8-channel CNN",
                              input_shape=(1, 28, 28))]
    """


@hookspec
def rankopt_datasets() -> Sequence[DatasetInfo]:
    """Register datasets that study files can name.

    Example::

        from rankopt import DatasetInfo, DatasetSplits, hookimpl

        def my_data(root: str = "data", **kwargs) -> DatasetSplits:
            train, val = load_my_tensors(root)          # torch Datasets
            return DatasetSplits(train=train, val=val, num_classes=10,
                                 input_shape=(3, 32, 32))

        @hookimpl
        def rankopt_datasets():
            return [DatasetInfo("my_data", my_data, "My labelled images")]
    """


@hookspec
def rankopt_trial_finished(
    run_dir: Path, trial_number: int, params: Mapping[str, Any], metrics: Mapping[str, Any]
) -> None:
    """Called after every trial of a study ends (completed or failed).

    ``metrics`` holds ``state`` ("COMPLETE" or "FAIL"), and for completed trials
    ``accuracy``, ``params`` and ``flops``; failed trials carry ``reason``.

    Example (a tracker)::

        @hookimpl
        def rankopt_trial_finished(run_dir, trial_number, params, metrics):
            mlflow.log_metrics({k: v for k, v in metrics.items()
                                if isinstance(v, (int, float))}, step=trial_number)
    """


@hookspec
def rankopt_study_finished(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """Called once when a study run ends; ``summary`` is what ``rankopt status --format json`` prints.

    Example::

        @hookimpl
        def rankopt_study_finished(run_dir, summary):
            print(f"{run_dir}: hypervolume {summary['hypervolume']}")
    """
