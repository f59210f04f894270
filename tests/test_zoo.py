"""torchvision classification models, random weights (nothing is downloaded), compressed on
every listed layer: a handful of small ones here, ViT-B/16, Swin-T and MaxViT-T marked
slow; benchmarks/bench_zoo.py runs the whole zoo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import rankopt
from rankopt.compression.surgery import modularized_copy


def _build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    for m in net.modules():  # torchvision zero-initializes some heads: logits would all be 0
        if isinstance(m, nn.Linear) and not m.weight.detach().any():
            nn.init.normal_(m.weight, std=0.02)
    return net


def _spec(net: nn.Module, census: rankopt.LayerCensus, layers: list[rankopt.LayerInfo], fraction: float) -> dict:
    """svd on every compressible Linear, tucker2 on every compressible Conv2d, each rank at
    ``fraction`` of its largest."""
    from rankopt.compression.surgery import get_submodule

    spec = {}
    for la in layers:
        if la.name not in census.compressible:
            continue
        dec = "svd" if la.kind == "linear" else "tucker2"
        largest = rankopt.decomposer(dec).max_ranks(get_submodule(net, la.name))
        spec[la.name] = {"decomposer": dec, "ranks": [max(1, int(r * fraction)) for r in largest]}
    return spec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


# (name, input size, (compressible, refused, skipped)) counted on torchvision 0.29
SMALL = [
    ("squeezenet1_1", 64, (26, 0, 0)),
    ("shufflenet_v2_x0_5", 64, (38, 19, 0)),
    ("mobilenet_v3_small", 64, (43, 11, 0)),
    ("mnasnet0_5", 64, (36, 17, 0)),
]


@pytest.mark.parametrize(("name", "size", "counts"), SMALL, ids=[s[0] for s in SMALL])
def test_small_zoo_models_compress_at_half_rank_on_every_layer(name: str, size: int, counts: tuple[int, int, int]) -> None:
    net = _build(name)
    shape = (1, 3, size, size)
    census = rankopt.layer_census(net, shape)
    assert (len(census.compressible), len(census.refused), len(census.skipped)) == counts
    assert set(census.refused.values()) <= {"grouped/depthwise convolution (groups > 1)"}
    layers = rankopt.find_layers(net, shape)
    x = torch.randn(2, 3, size, size)
    half = rankopt.compress(net, _spec(net, census, layers, 0.5), input_shape=shape)
    with torch.no_grad():
        assert half(x).shape == net(x).shape == (2, 1000)


def test_inception_aux_head_is_skipped_with_its_reason() -> None:
    net = _build("inception_v3", aux_logits=True, init_weights=False)
    census = rankopt.layer_census(net, (1, 3, 299, 299))
    assert sorted(census.skipped) == ["AuxLogits.conv0.conv", "AuxLogits.conv1.conv", "AuxLogits.fc"]
    assert all("never called by the forward pass in eval mode" in r for r in census.skipped.values())
    assert len(census.compressible) == 95 and not census.refused


def _done_when(net: nn.Module, shape: tuple[int, ...], min_linear: int, tmp_path: Path) -> rankopt.LayerCensus:
    """Every Linear (attention included) and every dense conv compressible; full rank equal
    to 1e-4 relative; half rank runs and exports to a checked ONNX file."""
    census = rankopt.layer_census(net, shape)
    layers = rankopt.find_layers(net, shape)
    linear = [la for la in layers if la.kind == "linear"]
    assert len(linear) >= min_linear
    # none left out: every Linear once attention calls its projections as modules
    assert len(linear) == sum(isinstance(m, nn.Linear) for m in modularized_copy(net).modules())
    assert all(la.name in census.compressible for la in linear)
    assert all(la.name in census.compressible for la in layers if la.kind == "conv2d" and la.groups == 1)
    assert not census.skipped
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        want = net(x)
        # the logits depend on the input (not just the head's bias), so the check below has teeth
        assert float((want[0] - want[1]).norm()) > 0.1 * float(want.norm())
        full = rankopt.compress(net, _spec(net, census, layers, 1.0), input_shape=shape)
        assert _rel(want, full(x)) < 1e-4
        del full
        half = rankopt.compress(net, _spec(net, census, layers, 0.5), input_shape=shape)
        assert half(x).shape == want.shape
    result = rankopt.export(half, tmp_path / "half.onnx", input_shape=shape, inputs=x, tolerance=1e-3)
    assert result.max_abs_diff <= 1e-3 and result.path.stat().st_size > 0
    return census


@pytest.mark.slow
def test_vit_b_16_every_linear_and_attention_projection_compressible(tmp_path: Path) -> None:
    # ViT-B/16's classes, depth and patch at ViT-Ti's width (192) on 64-pixel images: the
    # same 49 Linear and attention parents; B/16's 768-wide SVDs took 30 s of suite time.
    # benchmarks/bench_zoo.py runs vit_b_16 itself (RESULTS.md, "zoo").
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768).eval()
    nn.init.normal_(net.heads.head.weight, std=0.02)  # torchvision zero-initializes the head
    census = _done_when(net, (1, 3, 64, 64), 49, tmp_path)
    assert len(census.compressible) == 50 and not census.refused  # 49 Linear + conv_proj


@pytest.mark.slow
def test_swin_t_every_linear_and_window_attention_projection_compressible(tmp_path: Path) -> None:
    net = _build("swin_t")
    census = _done_when(net, (1, 3, 224, 224), 52, tmp_path)
    assert len(census.compressible) == 53 and not census.refused  # 52 Linear + the stem conv


@pytest.mark.slow
def test_maxvit_t_every_linear_and_dense_conv_compressible(tmp_path: Path) -> None:
    net = _build("maxvit_t")
    census = _done_when(net, (1, 3, 224, 224), 90, tmp_path)
    # its MBConv depthwise convs are refused, by name and reason
    assert len(census.compressible) == 140
    assert census.refused_by_reason() == {"grouped/depthwise convolution (groups > 1)": 11}
