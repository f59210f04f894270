"""The study's model built from its config, and the layers it compresses (the targets)."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from rankopt.config.schema import StudyConfig, import_model_factory
from rankopt.core.errors import ConfigError
from rankopt.contract.dataset import DatasetSplits
from rankopt.compression.surgery import LayerInfo, find_layers
from rankopt.core.limits import check_size_on_meta

__all__ = ["build_model", "find_targets", "thin_conv"]


def build_model(config: StudyConfig, splits: DatasetSplits) -> tuple[nn.Module, dict[str, Any]]:
    """``config.model`` built (``num_classes``/``in_channels`` from the data when the factory
    takes them), and the description of it that keys the cached reference."""
    from rankopt.contract.manager import get_registry

    assert config.model is not None
    name, kwargs = config.model.name, dict(config.model.kwargs)
    if ":" in name:
        factory = import_model_factory(name, "model.name", [config.model.path])
    else:
        factory = get_registry().record("models", name).factory
    from rankopt.config.schema import _signature_names

    accepts = _signature_names(factory)
    for key, value in (("num_classes", splits.num_classes), ("in_channels", splits.input_shape[0])):
        if key not in kwargs and (accepts is None or key in accepts):
            kwargs[key] = int(value)
    check_size_on_meta(factory, kwargs, "model.kwargs")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name: {name!r} returned {type(model).__name__}, not an nn.Module")
    base = {"callable": name, "kwargs": kwargs} if ":" in name else {"model": name, "kwargs": kwargs}
    return model, base


def thin_conv(model: nn.Module, name: str, max_channels: int) -> bool:
    """A conv with at most ``max_channels`` input channels (kept dense by default)."""
    module = model.get_submodule(name)
    return isinstance(module, nn.Conv2d) and module.in_channels <= max_channels


def find_targets(config: StudyConfig, model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerInfo]:
    """The Conv2d/Linear layers ``config.targets`` selects, less the thin convs; an error
    listing the model's layers when none is left."""
    targets = find_layers(
        model, input_shape, include=config.targets.include, exclude=config.targets.exclude
    )
    thin = config.targets.dense_input_channels
    targets = [t for t in targets if not thin_conv(model, t.name, thin)]
    if not targets:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        raise ConfigError(
            f"targets: include {config.targets.include} / exclude {config.targets.exclude} "
            f"match no Conv2d or Linear layer (convs with <= {thin} input channels stay "
            f"dense: targets.dense_input_channels); the model's layers are {names}"
        )
    return targets
