"""rankopt: compress CNNs with low-rank tensor decompositions and search for the best ranks.

The public API (see the README's user journeys)::

    import rankopt
    rankopt.plugin_names()
    dec = rankopt.decomposer("tucker2")
    rankopt.count(model, input_shape=(1, 3, 32, 32))
    small = rankopt.compress(model, {"layer1.0.conv1": {"decomposer": "tucker2", "ranks": [32, 32]}})
    result = rankopt.run_study("studies/quickstart.yaml"); result.front()
    rankopt.load_compressed("model.pt")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rankopt import _moved

_moved.install()  # the module paths of the flat layout keep working, with a DeprecationWarning

from rankopt.compression.accounting import Cost, count
from rankopt.deploy.artifacts import load_compressed, save_compressed
from rankopt.core.errors import __all__ as _ERRORS
from rankopt.core.errors import (
    ArtifactError,
    ConfigError,
    DecompositionError,
    DuplicateNameError,
    ExportError,
    InvalidRanksError,
    PluginError,
    RankoptError,
    StudyInterrupted,
    TrainingDivergedError,
    UnknownNameError,
    UnsupportedModuleError,
)
from rankopt.training.distill import Distillation
from rankopt.contract.hookspecs import hookimpl
from rankopt.contract.manager import get_registry, register_plugin, reset_registry
from rankopt.contract.dataset import DatasetSplits
from rankopt.contract.decomposer import Decomposer, InputHW
from rankopt.contract.decomposer import Options as DecomposerOptions
from rankopt.contract.selector import LayerChoice, RankSelector
from rankopt.contract.strategy import Strategy, TrialContext, TrialOutcome
from rankopt.core.records import (
    DatasetInfo,
    DecomposerInfo,
    ModelInfo,
    RankSelectorInfo,
    StrategyInfo,
)
from rankopt.compression.spectral import SpectralCache
from rankopt.compression.surgery import LayerInfo, compress, find_layers
from rankopt.compression.calibration import calibrate
from rankopt.compression.layer_census import LayerCensus, layer_census

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from rankopt.results.layer_table import LayerTable, inspect_layers
    from rankopt.study import Study, StudyResult, run_study

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # lookups
    "plugin_names",
    "decomposer",
    "rank_selector",
    "strategy",
    "model",
    "dataset",
    "register_plugin",
    "get_registry",
    "reset_registry",
    # accounting and surgery
    "Cost",
    "count",
    "LayerInfo",
    "find_layers",
    "layer_census",
    "calibrate",
    "LayerCensus",
    "compress",
    "save_compressed",
    "load_compressed",
    "SpectralCache",
    "Distillation",
    # studies
    "run_study",
    "Study",
    "StudyResult",
    # plugin authoring
    "hookimpl",
    "Decomposer",
    "DecomposerOptions",
    "InputHW",
    "RankSelector",
    "LayerChoice",
    "Strategy",
    "TrialContext",
    "TrialOutcome",
    "DatasetSplits",
    "DecomposerInfo",
    "RankSelectorInfo",
    "StrategyInfo",
    "ModelInfo",
    "DatasetInfo",
    # errors: every class of rankopt.core.errors
    *_ERRORS,
    # inspection
    "inspect_layers",
    "LayerTable",
    # deployment
    "densify",
    "export",
    "fold_batchnorm",
]


def plugin_names() -> dict[str, list[str]]:
    """The registered plugin names by family."""
    from rankopt.contract.manager import FAMILIES

    reg = get_registry()
    return {key: reg.names(key) for key in FAMILIES}


def decomposer(name: str) -> Decomposer:
    """The decomposer registered as ``name``; an unknown name lists the known ones."""
    return get_registry().create("decomposers", name)  # type: ignore[no-any-return]


def rank_selector(name: str) -> RankSelector:
    """The rank selector registered as ``name``."""
    return get_registry().create("rank_selectors", name)  # type: ignore[no-any-return]


def strategy(name: str) -> Strategy:
    """The training strategy registered as ``name``."""
    return get_registry().create("strategies", name)  # type: ignore[no-any-return]


def model(name: str, **kwargs: Any) -> nn.Module:
    """A new instance of the model registered as ``name``."""
    return get_registry().create("models", name, **kwargs)  # type: ignore[no-any-return]


def dataset(name: str, **kwargs: Any) -> DatasetSplits:
    """The splits of the dataset registered as ``name``."""
    return get_registry().create("datasets", name, **kwargs)  # type: ignore[no-any-return]


_LAZY = {
    "run_study": "rankopt.study", "Study": "rankopt.study", "StudyResult": "rankopt.study",
    "inspect_layers": "rankopt.results.layer_table", "LayerTable": "rankopt.results.layer_table",
    "export": "rankopt.deploy.exporting", "fold_batchnorm": "rankopt.deploy.exporting", "densify": "rankopt.deploy.exporting",
}


def __getattr__(name: str) -> Any:
    # studies pull in optuna storage, ray and plotting: import them on first use only
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rankopt' has no attribute {name!r}")
