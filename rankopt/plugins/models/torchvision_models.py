"""torchvision's ImageNet classifiers by name (``tv.<name>``), plus the aliases ``resnet18`` and ``vgg11``.

Built with ``torchvision.models.get_model``. ``weights`` (e.g. ``"DEFAULT"`` or
``"IMAGENET1K_V1"``) loads pretrained weights, which torchvision downloads into the
torch hub cache the first time, so it needs a network once (or the file copied into
``$TORCH_HOME/hub/checkpoints/``); the default, ``None``, builds a randomly initialized
model and never touches the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.datasets._params import check_positive_int, checked_params
from rankopt.core.records import ModelInfo

__all__ = ["torchvision_model", "torchvision_names", "TORCHVISION_CLASSIFIERS", "ALIASES", "PREFIX"]

PREFIX = "tv."
ALIASES: dict[str, str] = {"resnet18": "resnet18", "vgg11": "vgg11"}
_INPUT_SIZE = {"inception_v3": 299}
# torchvision's defaults for these return auxiliary outputs in train mode; a study
# trains with one cross-entropy on the main logits, so they are switched off
_BUILD_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


# The classification models of torchvision 0.29 (``torchvision.models.list_models``).
# Listed here rather than queried because importing torchvision.models takes seconds,
# and every process that builds the plugin registry (each CLI call) would pay for it;
# tests compare this list with the installed torchvision's.
TORCHVISION_CLASSIFIERS: tuple[str, ...] = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny",
    "densenet121", "densenet161", "densenet169", "densenet201", "efficientnet_b0",
    "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "efficientnet_v2_l",
    "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2",
    "mobilenet_v3_large", "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf",
    "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18",
    "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s",
    "swin_v2_t", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
    "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2",
    "wide_resnet50_2",
)


def torchvision_names() -> list[str]:
    """The classification models the installed torchvision provides (imports it: slow)."""
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _tv_version() -> str:
    import torchvision

    return str(torchvision.__version__)


def _resolve_weights(name: str, weights: Any) -> Any:
    import torchvision.models as tvm

    if weights is None:
        return None
    enum = tvm.get_model_weights(name)
    choices = [w for w in enum.__members__]
    key = str(weights).split(".")[-1]
    if not isinstance(weights, (str, enum)) or key not in choices:
        raise ConfigError(
            f"model '{PREFIX}{name}': weights must be null (random init) or one of "
            f"{', '.join(map(repr, choices))}, got {weights!r}"
        )
    return enum[key]


def _load_weights_file(name: str, weights: Any) -> None:
    """Fetch the weights into the hub cache now, so a missing network is a clear error."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cache.is_file():
        return
    try:
        torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket errors, hash mismatch
        raise ConfigError(
            f"model '{PREFIX}{name}': could not download weights {weights} from {weights.url} "
            f"({type(exc).__name__}: {exc}); copy that file to {cache} or use weights: null"
        ) from None


def _replace_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    first = next(((q, m) for q, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConfigError(
            f"model '{PREFIX}{name}' has no Conv2d to adapt to in_channels={in_channels}; use in_channels: 3"
        )
    qualname, old = first
    if old.groups != 1:
        raise ConfigError(
            f"model '{PREFIX}{name}': its first conv {qualname!r} is grouped; only in_channels: 3 is supported"
        )
    new = nn.Conv2d(
        in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
        old.dilation, 1, old.bias is not None, old.padding_mode,
    ).to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        # keep pretrained filters: their channel mean, spread over the new channels so a
        # grey image replicated to every channel gives the same activations as before
        new.weight.copy_(old.weight.mean(dim=1, keepdim=True).expand_as(new.weight) * old.in_channels / in_channels)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.set_submodule(qualname, new)
    if getattr(model, "transform_input", False):  # inception/googlenet's RGB re-normalization
        model.transform_input = False


def _replace_head(model: nn.Module, num_classes: int, name: str) -> None:
    linears = [(q, m) for q, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        qualname, old = linears[-1]
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:  # squeezenet classifies with a 1x1 conv
        convs = [(q, m) for q, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        qualname, old = convs[-1]
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding)
    model.set_submodule(qualname, new.to(device=old.weight.device, dtype=old.weight.dtype))


def torchvision_model(
    name: str,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    weights: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``torchvision.models.get_model(name, ...)`` adapted to a study's data.

    With pretrained ``weights`` and ``num_classes`` other than the weights' categories,
    the last Linear (squeezenet: the last conv) is replaced by a new randomly
    initialized one; ``in_channels`` other than 3 replaces the first conv (keeping the
    pretrained filters' channel mean). ``options`` are passed to torchvision's builder
    (e.g. ``{"dropout": 0.2}``).
    """
    import torchvision.models as tvm

    owner = f"model '{PREFIX}{name}'"
    check_positive_int(owner, "num_classes", num_classes)
    check_positive_int(owner, "in_channels", in_channels)
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(f"{owner}: options must be a mapping of builder arguments, got {options!r}")
    if name not in tvm.list_models(module=tvm):
        raise ConfigError(
            f"{owner}: the installed torchvision {_tv_version()} has no model {name!r}; "
            "upgrade torchvision or pick another model"
        )
    resolved = _resolve_weights(name, weights)
    config: dict[str, Any] = {**_BUILD_DEFAULTS.get(name, {}), **(options or {})}
    if resolved is not None:
        config.pop("init_weights", None)
        _load_weights_file(name, resolved)
    else:
        config["num_classes"] = num_classes
    try:
        model = tvm.get_model(name, weights=resolved, **config)
    except TypeError as exc:
        raise ConfigError(f"{owner}: torchvision rejected options {dict(options or {})!r}: {exc}") from None
    if resolved is not None and len(resolved.meta["categories"]) != num_classes:
        _replace_head(model, num_classes, name)
    if in_channels != 3:
        _replace_first_conv(model, in_channels, name)
    return model


def _factory(tv_name: str, registered: str):  # type: ignore[no-untyped-def]
    @checked_params("model", registered)
    def factory(
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        weights: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> nn.Module:
        return torchvision_model(
            tv_name, num_classes=num_classes, in_channels=in_channels, weights=weights, options=options
        )

    factory.__name__ = registered.replace(".", "_")
    factory.__doc__ = f"torchvision's {tv_name}.\n\n" + (torchvision_model.__doc__ or "")
    return factory


def _record(tv_name: str, registered: str) -> ModelInfo:
    size = _INPUT_SIZE.get(tv_name, 224)
    return ModelInfo(
        registered,
        _factory(tv_name, registered),
        f"torchvision {tv_name} (ImageNet architecture, {size}x{size}); params: weights, options",
        input_shape=(3, size, size),
    )


@hookimpl
def rankopt_models() -> list[ModelInfo]:
    records = [_record(n, PREFIX + n) for n in TORCHVISION_CLASSIFIERS]
    records += [_record(target, alias) for alias, target in ALIASES.items()]
    return records
