"""LeNet-5 for 28x28 MNIST, optionally with NRMF's extra 3x3 128->256 conv."""

from __future__ import annotations

import torch
import torch.nn as nn

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.datasets._params import check_positive_int, checked_params
from rankopt.core.records import ModelInfo

__all__ = ["LeNet5", "lenet5", "LENET_VARIANTS"]

# (conv1 channels, conv1 padding, conv2 channels, hidden fc sizes)
LENET_VARIANTS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "caffe": (20, 0, 50, (500,)),  # the Caffe/PyTorch MNIST example used by compression papers
    "classic": (6, 2, 16, (120, 84)),  # LeCun et al. 1998
}
EXTRA_IN, EXTRA_OUT = 128, 256


class LeNet5(nn.Module):
    """conv5x5 -> ReLU -> max-pool -> conv5x5 -> ReLU -> [extra conv3x3] -> max-pool -> FCs.

    ``variant="caffe"``: 20 and 50 channels, one hidden FC of 500 (the common MNIST
    LeNet of compression papers); ``"classic"``: 6 and 16 channels (conv1 padded to keep
    28x28), hidden FCs of 120 and 84, as in LeCun et al. 1998.

    ``extra_conv=True`` builds the "modified LeNet5" of the NRMF paper (Sec. "Effect of
    Regularizer"), which inserts a conv with a 3x3x128x256 kernel. The paper does not
    say where; we put it after conv2 (padding 1, so the size is kept) and widen conv2
    to the 128 channels that kernel needs, before the second pool.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        variant: str = "caffe",
        extra_conv: bool = False,
        input_size: int = 28,
    ) -> None:
        super().__init__()
        c1, pad1, c2, hidden = LENET_VARIANTS[variant]
        if extra_conv:
            c2 = EXTRA_IN
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=pad1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.conv3 = nn.Conv2d(EXTRA_IN, EXTRA_OUT, 3, padding=1) if extra_conv else None
        self.pool2 = nn.MaxPool2d(2)
        side = ((input_size + 2 * pad1 - 4) // 2 - 4) // 2
        if side < 1:
            raise ConfigError(
                f"model 'lenet5': input_size={input_size} is too small for two 5x5 convs and "
                "two 2x2 pools; use at least 16 (MNIST is 28)"
            )
        widths = (EXTRA_OUT if extra_conv else c2) * side * side, *hidden
        self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.fc_out = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        if self.conv3 is not None:
            x = torch.relu(self.conv3(x))
        x = torch.flatten(self.pool2(x), 1)
        for fc in self.fcs:
            x = torch.relu(fc(x))
        return self.fc_out(x)


@checked_params("model", "lenet5")
def lenet5(
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    variant: str = "caffe",
    extra_conv: bool = False,
    input_size: int = 28,
) -> LeNet5:
    """Build :class:`LeNet5` (``variant`` 'caffe' or 'classic'; ``extra_conv`` for NRMF's test)."""
    owner = "model 'lenet5'"
    check_positive_int(owner, "num_classes", num_classes)
    check_positive_int(owner, "in_channels", in_channels)
    check_positive_int(owner, "input_size", input_size)
    if variant not in LENET_VARIANTS:
        raise ConfigError(
            f"{owner}: variant must be one of {', '.join(map(repr, LENET_VARIANTS))}, got {variant!r}"
        )
    if not isinstance(extra_conv, bool):
        raise ConfigError(f"{owner}: extra_conv must be true or false, got {extra_conv!r}")
    return LeNet5(num_classes, in_channels, variant, extra_conv, input_size)


@hookimpl
def rankopt_models() -> list[ModelInfo]:
    return [
        ModelInfo(
            "lenet5",
            lenet5,
            "LeNet-5 for 28x28 MNIST; params: variant (caffe|classic), extra_conv "
            "(NRMF's 3x3 128->256 conv), input_size",
            input_shape=(1, 28, 28),
        )
    ]
