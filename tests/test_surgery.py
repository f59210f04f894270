"""Model surgery on torchvision models: compress every 3x3 conv with Tucker-2 at half ranks."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import rankopt
from rankopt.compression.accounting import Cost, layer_cost
from rankopt.core.errors import ConfigError, InvalidRanksError, UnknownNameError
from rankopt.plugins.decomposers.tucker2 import Tucker2Conv2d
from rankopt.compression.surgery import find_layers

INPUT = (2, 3, 32, 32)


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def vgg11() -> nn.Module:
    model = torchvision.models.vgg11(num_classes=10)
    # the stock head is 120M parameters of Linear that the test never touches; one Linear
    # keeps the test light (the adaptive pool still hands it 512x7x7 at a 32x32 input)
    model.classifier = nn.Linear(512 * 7 * 7, 10)
    return model


def _half_rank_spec(model: nn.Module) -> tuple[dict[str, dict[str, object]], Cost]:
    """Tucker-2 at half ranks for every 3x3 conv, and the cost drop ``cost()`` predicts."""
    dec = rankopt.decomposer("tucker2")
    spec: dict[str, dict[str, object]] = {}
    drop = Cost(0, 0)
    for info in find_layers(model, (1, *INPUT[1:])):
        if info.kind != "conv2d" or info.kernel_size != (3, 3):
            continue
        module = model.get_submodule(info.name)
        ranks = [max(1, r // 2) for r in dec.max_ranks(module)]
        spec[info.name] = {"decomposer": "tucker2", "ranks": ranks}
        drop = drop + (layer_cost(module, info.input_hw) - dec.cost(module, ranks, input_hw=info.input_hw))
    return spec, drop


@pytest.mark.parametrize(("make", "n_convs"), [(resnet18, 16), (vgg11, 8)], ids=["resnet18", "vgg11"])
def test_tucker2_half_ranks_on_every_3x3_conv(tmp_path: Path, make: Callable[[], nn.Module], n_convs: int) -> None:
    torch.manual_seed(0)
    model = make().eval()
    before_state = copy.deepcopy(model.state_dict())
    before = rankopt.count(model, (1, *INPUT[1:]))
    spec, predicted_drop = _half_rank_spec(model)
    assert len(spec) == n_convs

    spec = json.loads(json.dumps(spec))  # the spec is plain JSON
    small = rankopt.compress(model, spec).eval()

    after = rankopt.count(small, (1, *INPUT[1:]))
    assert before - after == predicted_drop
    assert after.params < before.params and after.flops < before.flops
    assert all(isinstance(small.get_submodule(n), Tucker2Conv2d) for n in spec)

    x = torch.randn(*INPUT)
    with torch.no_grad():
        y = small(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()

    # the original is untouched
    assert all(isinstance(model.get_submodule(n), nn.Conv2d) for n in spec)
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert rankopt.count(model, (1, *INPUT[1:])) == before

    # rebuilt from (spec, state_dict) on a fresh, differently initialized base: same bits
    path = rankopt.save_compressed(tmp_path / "small.pt", small, spec, input_shape=INPUT)
    torch.manual_seed(1)
    loaded = rankopt.load_compressed(path, model=make())
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_compress_checks_the_whole_spec_first() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    ok = {"decomposer": "tucker2", "ranks": [2, 2]}
    with pytest.raises(ConfigError, match="'nope' is not a submodule"):
        rankopt.compress(model, {"0": ok, "nope": ok})
    with pytest.raises(UnknownNameError, match="unknown decomposer 'tucker3'.*'tucker2'"):
        rankopt.compress(model, {"0": ok, "2": {"decomposer": "tucker3", "ranks": [2, 2]}})
    with pytest.raises(InvalidRanksError, match=r"layer '2' must be an integer in \[1, 8\], got 9"):
        rankopt.compress(model, {"0": ok, "2": {"decomposer": "tucker2", "ranks": [2, 9]}})


def test_compress_mixes_decomposers_and_keeps_options() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.Flatten(), nn.Linear(12 * 64, 10)
    ).double().eval()
    spec = {
        "0": {"decomposer": "svd", "ranks": [8]},
        "2": {"decomposer": "tt", "ranks": [2, 8, 12, 4], "options": {"in_factors": [2, 4], "out_factors": [3, 4]}},
        "4": {"decomposer": "svd", "ranks": [10]},
    }
    small = rankopt.compress(model, spec)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():  # full ranks everywhere: the same function
        assert torch.allclose(small(x), model(x), atol=1e-10)
    assert small[2].out_factors == (3, 4)
