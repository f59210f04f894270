"""Accounting against torch.utils.flop_counter, and find_layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _decomposer_cases import flops_of, params_of

from rankopt import count, find_layers
from rankopt.compression.accounting import Cost, conv2d_output_hw, layer_cost

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

CONVS = {
    "k3_p1": (lambda: nn.Conv2d(3, 8, 3, padding=1), (9, 11)),
    "k3_stride2": (lambda: nn.Conv2d(4, 6, 3, stride=2, bias=False), (9, 12)),
    "k3x5_p1x2_stride2x1": (lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2)), (10, 9)),
    "k3_dil2_p2": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2), (8, 8)),
    "same_dil2": (lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=(2, 1)), (7, 9)),
    "same_even": (lambda: nn.Conv2d(4, 6, (2, 4), padding="same"), (7, 9)),
    "valid": (lambda: nn.Conv2d(4, 6, 3, padding="valid"), (7, 9)),
    "grouped": (lambda: nn.Conv2d(4, 8, 3, groups=2, padding=1), (6, 6)),
    "depthwise_stride3": (lambda: nn.Conv2d(6, 6, 3, groups=6, stride=3), (11, 10)),
    "k1": (lambda: nn.Conv2d(8, 4, 1), (5, 5)),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_layer_cost_matches_flop_counter(name: str) -> None:
    make, hw = CONVS[name]
    conv = make()
    x = torch.randn(1, conv.in_channels, *hw)
    assert layer_cost(conv, hw) == Cost(params_of(conv), flops_of(conv, x))
    assert conv2d_output_hw(hw, conv.kernel_size, conv.stride, conv.padding, conv.dilation) == tuple(conv(x).shape[-2:])


@pytest.mark.parametrize("bias", [True, False])
def test_linear_layer_cost_matches_flop_counter(bias: bool) -> None:
    lin = nn.Linear(12, 7, bias=bias)
    assert layer_cost(lin) == Cost(12 * 7 + (7 if bias else 0), flops_of(lin, torch.randn(1, 12))) == Cost(
        params_of(lin), 2 * 12 * 7
    )


def test_layer_cost_needs_the_input_size_of_a_conv() -> None:
    with pytest.raises(ValueError, match="input_hw is required"):
        layer_cost(nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="BatchNorm2d"):
        layer_cost(nn.BatchNorm2d(3))


class Net(nn.Module):
    """Convs at three resolutions, a branch never run, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.ModuleDict({"conv": nn.Conv2d(8, 16, (1, 3), padding=(0, 1)), "bn": nn.BatchNorm2d(16)})
        self.unused = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.relu(self.stem(x)))
        x = self.block2["bn"](self.block2["conv"](x))
        return self.head(x.mean(dim=(2, 3)))


def test_count_of_a_model_matches_flop_counter_and_the_layer_sum() -> None:
    net = Net().eval()
    total = count(net, (1, 3, 32, 40))
    assert total.params == params_of(net)
    assert total.flops == flops_of(net, torch.zeros(1, 3, 32, 40))
    layers = find_layers(net, (1, 3, 32, 40))
    assert total.flops == sum(info.cost.flops for info in layers)  # only convs and the Linear count
    assert count(net, (2, 3, 32, 40)).flops == 2 * total.flops


def test_find_layers_reports_names_shapes_and_input_sizes() -> None:
    net = Net()
    layers = {info.name: info for info in find_layers(net, (1, 3, 32, 40))}
    assert list(layers) == ["stem", "block.0", "block2.conv", "head"]  # 'unused' is never reached
    stem, conv, conv2, head = layers.values()
    assert (stem.kind, stem.shape, stem.stride, stem.input_hw) == ("conv2d", (8, 3, 3, 3), (2, 2), (32, 40))
    assert (conv.shape, conv.input_hw) == ((8, 8, 3, 3), (16, 20))
    assert (conv2.shape, conv2.input_hw) == ((16, 8, 1, 3), (8, 10))
    assert (head.kind, head.shape, head.input_hw) == ("linear", (10, 16, 1, 1), None)
    assert stem.cost == layer_cost(net.stem, (32, 40)) and head.cost == layer_cost(net.head)
    # without an input shape nothing runs: every layer, no input sizes
    static = find_layers(net)
    assert [i.name for i in static] == ["stem", "block.0", "block2.conv", "unused", "head"]
    assert all(i.input_hw is None for i in static)


def test_find_layers_include_and_exclude_globs() -> None:
    net = Net()

    def names(**kw: object) -> list[str]:
        return [i.name for i in find_layers(net, (1, 3, 16, 16), **kw)]  # type: ignore[arg-type]

    assert names(include=["block*"]) == ["block.0", "block2.conv"]
    assert names(exclude=["head", "stem"]) == ["block.0", "block2.conv"]
    assert names(include=["*conv", "stem"], exclude=["block2.*"]) == ["stem"]
    assert names(include=["nothing*"]) == []
