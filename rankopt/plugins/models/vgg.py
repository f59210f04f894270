"""VGG with BatchNorm for 32x32 images (the CIFAR variants of Simonyan & Zisserman's configs)."""

from __future__ import annotations

import torch
import torch.nn as nn

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.datasets._params import check_positive_int, checked_params
from rankopt.core.records import ModelInfo

__all__ = ["CifarVGG", "VGG_CONFIGS", "vgg_cifar"]

# torchvision's configs A, B, D, E ("M" is a 2x2 max-pool)
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"],
}


class CifarVGG(nn.Module):
    """VGG-``depth`` with BatchNorm for 32x32 input: the conv stack of the ImageNet
    config (five pools take 32x32 to 1x1), then the classifier.

    ``classifier_layers=1`` is one Linear(512, classes) (the usual CIFAR VGG);
    ``2`` adds a hidden Linear(512, 512) + ReLU + Dropout, for studies that compress
    fully connected layers too. ``width_multiplier`` scales every conv's channels
    (e.g. 0.25 for a fast CPU model). Layer names follow torchvision (``features.N``,
    ``classifier.N``).
    """

    def __init__(
        self,
        depth: int = 16,
        num_classes: int = 10,
        in_channels: int = 3,
        classifier_layers: int = 1,
        width_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in VGG_CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cout = max(1, round(int(item) * width_multiplier))
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        # a no-op on 32x32 input; lets other sizes through to the same classifier
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if classifier_layers == 1:
            self.classifier = nn.Sequential(nn.Linear(cin, num_classes))
        else:
            self.classifier = nn.Sequential(
                nn.Linear(cin, cin), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(cin, num_classes)
            )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg_cifar(depth: int) -> object:
    """The factory of CIFAR VGG-``depth`` (11, 13, 16 or 19)."""
    name = f"vgg{depth}_cifar"

    @checked_params("model", name)
    def factory(
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        classifier_layers: int = 1,
        width_multiplier: float = 1.0,
    ) -> CifarVGG:
        owner = f"model {name!r}"
        check_positive_int(owner, "num_classes", num_classes)
        check_positive_int(owner, "in_channels", in_channels)
        if classifier_layers not in (1, 2):
            raise ConfigError(f"{owner}: classifier_layers must be 1 or 2, got {classifier_layers!r}")
        if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float)) \
                or not 0 < width_multiplier <= 16:
            raise ConfigError(f"{owner}: width_multiplier must be a number in (0, 16], got {width_multiplier!r}")
        return CifarVGG(depth, num_classes, in_channels, classifier_layers, float(width_multiplier))

    factory.__name__ = name
    factory.__doc__ = f"VGG-{depth} with BatchNorm for CIFAR.\n\n" + (CifarVGG.__doc__ or "")
    return factory


@hookimpl
def rankopt_models() -> list[ModelInfo]:
    return [
        ModelInfo(
            f"vgg{depth}_cifar",
            vgg_cifar(depth),  # type: ignore[arg-type]
            f"VGG-{depth} with BatchNorm for 32x32 images; params: classifier_layers (1|2), "
            "width_multiplier",
            input_shape=(3, 32, 32),
        )
        for depth in (11, 13, 16, 19)
    ]
