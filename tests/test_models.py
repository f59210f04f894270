"""Built-in models: every one builds with num_classes/in_channels and runs forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.core.errors import ConfigError
from rankopt.plugins.datasets._params import ParameterError
from rankopt.plugins.models import torchvision_models as tvm_plugin

OWN_MODELS = [
    "small_cnn", "lenet5", "resnet18_cifar", "resnet20_cifar", "resnet56_cifar",
    "vgg11_cifar", "vgg13_cifar", "vgg16_cifar", "vgg19_cifar",
]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_the_built_in_models() -> None:
    names = set(rankopt.plugin_names()["models"])
    assert set(OWN_MODELS) <= names
    assert {"resnet18", "vgg11", "tv.resnet18", "tv.mobilenet_v2", "tv.vgg11"} <= names


def test_static_torchvision_list_matches_the_installed_torchvision() -> None:
    assert list(tvm_plugin.TORCHVISION_CLASSIFIERS) == tvm_plugin.torchvision_names()


@pytest.mark.parametrize("name", OWN_MODELS)
def test_own_models_build_and_run_at_their_input_shape(name: str) -> None:
    record = rankopt.get_registry().record("models", name)
    channels, height, width = record.input_shape
    model = record.factory(num_classes=7, in_channels=2)
    out = model.eval()(torch.randn(2, 2, height, width))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert not any(isinstance(m, nn.modules.lazy.LazyModuleMixin) for m in model.modules())


@pytest.mark.parametrize("name", ["small_cnn", "lenet5", "resnet20_cifar", "vgg11_cifar"])
def test_models_are_deterministic_given_torch_seed(name: str) -> None:
    torch.manual_seed(1)
    a = rankopt.model(name, num_classes=10, in_channels=3)
    torch.manual_seed(1)
    b = rankopt.model(name, num_classes=10, in_channels=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_known_parameter_counts() -> None:
    # published sizes: Caffe LeNet 431k, CIFAR ResNet-18 11.17M, CIFAR VGG-16 (BN, 1 FC) 14.73M
    assert _count(rankopt.model("lenet5", num_classes=10, in_channels=1)) == 431_080
    assert _count(rankopt.model("lenet5", num_classes=10, in_channels=1, variant="classic")) == 61_706
    assert _count(rankopt.model("resnet18_cifar", num_classes=10, in_channels=3)) == 11_173_962
    assert _count(rankopt.model("vgg16_cifar", num_classes=10, in_channels=3)) == 14_728_266


def test_resnet18_cifar_has_a_3x3_stem_and_no_max_pool() -> None:
    model = rankopt.model("resnet18_cifar", num_classes=10, in_channels=3)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert model.layer4[1].conv2.out_channels == 512 and model.fc.in_features == 512


def test_resnet20_cifar_structure() -> None:
    model = rankopt.model("resnet20_cifar", num_classes=10, in_channels=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.kernel_size == (3, 3) for c in convs) == 19  # 6n+1 with n=3
    assert sum(c.kernel_size == (1, 1) for c in convs) == 2  # the two projection shortcuts
    assert [c.out_channels for c in convs if c.kernel_size == (3, 3)][-1] == 64


def test_lenet5_extra_conv_is_nrmfs_3x3_128_to_256() -> None:
    model = rankopt.model("lenet5", num_classes=10, in_channels=1, extra_conv=True)
    assert model.conv3.weight.shape == (256, 128, 3, 3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    plain = rankopt.model("lenet5", num_classes=10, in_channels=1)
    assert plain.conv3 is None


def test_vgg_classifier_layers_and_width() -> None:
    two = rankopt.model("vgg11_cifar", num_classes=10, in_channels=3, classifier_layers=2,
                        width_multiplier=0.25)
    linears = [m for m in two.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 128), (128, 10)]
    assert two(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "tv.mobilenet_v3_small", "tv.squeezenet1_1"])
def test_torchvision_models_build_with_classes_and_channels(name: str) -> None:
    record = rankopt.get_registry().record("models", name)
    assert record.input_shape == (3, 224, 224)
    model = record.factory(num_classes=5, in_channels=1)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    size = 224 if name == "resnet18" else 64  # the full shape once, small inputs for the rest
    assert model.eval()(torch.randn(1, 1, size, size)).shape == (1, 5)


def test_first_conv_replacement_keeps_grey_responses() -> None:
    torch.manual_seed(0)
    model = rankopt.model("tv.resnet18", num_classes=10, in_channels=3)
    old = model.conv1
    tvm_plugin._replace_first_conv(model, 1, "resnet18")
    grey = torch.rand(1, 1, 16, 16)
    assert torch.allclose(model.conv1(grey), old(grey.expand(1, 3, 16, 16)), atol=1e-5)


def test_head_replacement_for_pretrained_class_counts() -> None:
    model = rankopt.model("tv.resnet18", num_classes=1000, in_channels=3)
    tvm_plugin._replace_head(model, 7, "resnet18")
    assert model.fc.out_features == 7
    squeeze = rankopt.model("tv.squeezenet1_1", num_classes=1000, in_channels=3)
    tvm_plugin._replace_head(squeeze, 7, "squeezenet1_1")
    assert squeeze.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_model_errors_name_the_model_and_the_rule() -> None:
    with pytest.raises(ParameterError, match=r"model 'small_cnn' got unknown parameter\(s\) 'widht'; "
                       r"it accepts: num_classes, in_channels, width"):
        rankopt.model("small_cnn", widht=8)
    with pytest.raises(ConfigError, match=r"model 'lenet5': variant must be one of 'caffe', 'classic', got 'x'"):
        rankopt.model("lenet5", variant="x")
    with pytest.raises(ConfigError, match=r"model 'vgg16_cifar': classifier_layers must be 1 or 2, got 3"):
        rankopt.model("vgg16_cifar", classifier_layers=3)
    with pytest.raises(ConfigError, match=r"num_classes must be an integer >= 1, got 0"):
        rankopt.model("resnet20_cifar", num_classes=0)
    # an unknown weights name fails before any download is tried
    with pytest.raises(ConfigError, match=r"weights must be null .* or one of 'IMAGENET1K_V1', 'DEFAULT', got 'imagenet'"):
        rankopt.model("tv.resnet18", weights="imagenet")
    with pytest.raises(ConfigError, match=r"torchvision rejected options"):
        rankopt.model("tv.resnet18", options={"no_such_option": 1})
