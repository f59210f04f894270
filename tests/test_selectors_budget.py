"""The global budget allocator on torchvision's ResNet-18 (10 classes, 32x32 input)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.compression.selection import select_spec
from rankopt.compression.spectral import SpectralCache

INPUT_SHAPE = (1, 3, 32, 32)


def seeded_resnet18() -> nn.Module:
    """The same randomly initialized ResNet-18 as `rankopt inspect resnet18 --seed 0`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return rankopt.model("resnet18", num_classes=10).eval()


def shared_resnet18_cache(tmp_path_factory: pytest.TempPathFactory) -> SpectralCache:
    # the session's base temp is shared by every test module: its spectra are computed once
    return SpectralCache(Path(tmp_path_factory.getbasetemp()) / "resnet18-seed0-spectra")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, list, dict, SpectralCache, object]:
    model = seeded_resnet18()
    layers = rankopt.find_layers(model, INPUT_SHAPE)
    decomposers = {la.name: "tucker2" for la in layers if la.kind == "conv2d"}
    return model, layers, decomposers, shared_resnet18_cache(tmp_path_factory), rankopt.count(model, INPUT_SHAPE)


@pytest.mark.parametrize("measure", ["params", "flops"])
@pytest.mark.parametrize("target", [0.5, 0.25])
def test_budget_meets_model_target_within_one_percent(setup, measure: str, target: float) -> None:
    model, layers, decomposers, cache, base = setup
    spec, choices = select_spec(
        model, layers, decomposers, "budget", {"target": target, "measure": measure},
        cache=cache, input_shape=INPUT_SHAPE,
    )
    small = rankopt.compress(model, spec, initialize=False)
    kept = rankopt.count(small, INPUT_SHAPE)
    fraction = (kept.params / base.params) if measure == "params" else (kept.flops / base.flops)
    assert fraction <= target * (1 + 1e-9)
    assert fraction == pytest.approx(target, rel=0.01)
    assert len(choices) == len(decomposers)
    # the other measure shrinks too, and every compressed layer is smaller than before
    assert kept.params < base.params and kept.flops < base.flops
    for c in choices:
        if c.ranks is not None:
            assert c.cost.params < c.original_cost.params and c.cost.flops <= c.original_cost.flops


def test_minmax_meets_target_and_trades_total_loss_for_worst_loss(setup) -> None:
    model, layers, decomposers, cache, base = setup
    results = {}
    for method in ("greedy", "minmax"):
        spec, choices = select_spec(
            model, layers, decomposers, "budget", {"target": 0.3, "method": method}, cache=cache,
        )
        kept = rankopt.count(rankopt.compress(model, spec, initialize=False), INPUT_SHAPE)
        assert kept.params / base.params == pytest.approx(0.3, rel=0.01)
        losses = [_discarded(model, c, cache) for c in choices]
        results[method] = (sum(losses), max(losses))
    greedy, minmax = results["greedy"], results["minmax"]
    assert greedy[0] <= minmax[0] + 1e-9  # greedy keeps the most energy in total
    assert minmax[1] <= greedy[1] + 1e-9  # minmax has the smallest worst layer


def _discarded(model: nn.Module, choice, cache: SpectralCache) -> float:
    """Sum over the two Tucker-2 modes of the discarded squared-energy fraction."""
    if choice.ranks is None:
        return 0.0
    dec = rankopt.decomposer("tucker2")
    total = 0.0
    for matrix, r in zip(dec.rank_matrices(model.get_submodule(choice.name).weight), choice.ranks):
        e = cache.singular_values(matrix) ** 2
        total += float(e[r:].sum() / e.sum())
    return total


def test_layers_scope_and_unreachable_target(setup) -> None:
    model, layers, decomposers, cache, base = setup
    convs = [la for la in layers if la.name in decomposers]
    spec, _ = select_spec(
        model, layers, decomposers, "budget", {"target": 0.4, "scope": "layers"}, cache=cache,
    )
    before = sum(la.cost.params for la in convs)
    after = sum(
        rankopt.decomposer("tucker2").cost(model.get_submodule(n), e["ranks"], (32, 32)).params for n, e in spec.items()
    ) + sum(la.cost.params for la in convs if la.name not in spec)
    assert after / before == pytest.approx(0.4, rel=0.01)
    # only layer4 may shrink: a model-wide 10 % is out of reach, so the smallest ranks are used
    only4 = {n: d for n, d in decomposers.items() if n.startswith("layer4")}
    with pytest.warns(UserWarning, match="cannot be reached"):
        spec, choices = select_spec(model, layers, only4, "budget", {"target": 0.1}, cache=cache)
    assert all(c.ranks is not None and "cannot be reached" in c.reason for c in choices)
    largest_reach = spec  # every layer at its cheapest option
    assert all(min(e["ranks"]) >= 1 for e in largest_reach.values())


def test_flops_budget_infers_input_shape_from_the_first_conv(setup) -> None:
    model, layers, decomposers, cache, base = setup
    params = {"target": 0.5, "measure": "flops"}
    with_shape, _ = select_spec(model, layers, decomposers, "budget", params, cache=cache, input_shape=INPUT_SHAPE)
    inferred, _ = select_spec(model, layers, decomposers, "budget", params, cache=cache)
    assert inferred == with_shape
