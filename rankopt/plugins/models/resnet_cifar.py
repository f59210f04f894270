"""CIFAR-style ResNets: ResNet-18 (torchvision's, with a 3x3 stem) and the 6n+2 family (ResNet-20/56)."""

from __future__ import annotations

import torch
import torch.nn as nn

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.datasets._params import check_positive_int, checked_params
from rankopt.core.records import ModelInfo

__all__ = ["resnet18_cifar", "CifarResNet", "resnet_cifar"]


def _check(owner: str, num_classes: int, in_channels: int) -> None:
    check_positive_int(owner, "num_classes", num_classes)
    check_positive_int(owner, "in_channels", in_channels)


@checked_params("model", "resnet18_cifar")
def resnet18_cifar(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """ResNet-18 for 32x32 images: torchvision's ResNet with BasicBlocks [2, 2, 2, 2]
    (64, 128, 256, 512 channels), a 3x3 stride-1 stem and no max-pool, as in the NRMF
    ResNet-18/CIFAR-10 table.

    Layer names are torchvision's (``conv1``, ``layer1.0.conv1``, ..., ``fc``), so specs
    written for the ImageNet model carry over. For a small CPU model take ``resnet20_cifar``.
    """
    from torchvision.models.resnet import BasicBlock, ResNet

    _check("model 'resnet18_cifar'", num_classes, in_channels)
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


class _Block(nn.Module):
    """A basic residual block; a 1x1 conv + BN projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNets of He et al. 2016 (Sec. 4.2): depth 6n+2, three stages of n
    blocks with ``width``, 2x and 4x channels, global average pool, one Linear.

    Shortcuts that change shape use a 1x1 conv projection (the paper's option B) rather
    than zero-padding (option A), so every layer is an ordinary Conv2d the decomposers
    and the accounting understand. Names follow torchvision (``layer1.0.conv1``, ``fc``).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        cin = width
        for i in range(3):
            cout = width * 2**i
            blocks = [_Block(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_cifar(depth: int) -> object:
    """The factory of the CIFAR ResNet of the given depth (6n+2)."""

    @checked_params("model", f"resnet{depth}_cifar")
    def factory(*, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
        owner = f"model 'resnet{depth}_cifar'"
        _check(owner, num_classes, in_channels)
        check_positive_int(owner, "width", width)
        return CifarResNet(depth, num_classes, in_channels, width)

    if (depth - 2) % 6 or depth < 8:
        raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    factory.__name__ = f"resnet{depth}_cifar"
    factory.__doc__ = f"ResNet-{depth} for CIFAR.\n\n" + (CifarResNet.__doc__ or "")
    return factory


@hookimpl
def rankopt_models() -> list[ModelInfo]:
    records = [
        ModelInfo(
            "resnet18_cifar",
            resnet18_cifar,
            "ResNet-18 for 32x32 images (3x3 stem, no max-pool, 11M params)",
            input_shape=(3, 32, 32),
        )
    ]
    for depth in (20, 56):
        records.append(
            ModelInfo(
                f"resnet{depth}_cifar",
                resnet_cifar(depth),  # type: ignore[arg-type]
                f"ResNet-{depth} for CIFAR (He et al. 2016, 16/32/64 channels); params: width",
                input_shape=(3, 32, 32),
            )
        )
    return records
