"""``seed_proposals``: a study seeded with the rank selectors' one-shot proposals."""

from __future__ import annotations

import math
from typing import Any

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

import rankopt
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError
from rankopt.search.seeding import proposal_points, spread_value
from rankopt.search.space import SearchSpace
from study_support import small_study


def study_dict(tmp_path: Any, **changes: Any) -> dict[str, Any]:
    selectors = {"energy": {"p": {"low": 0.6, "high": 0.99}}, "vbmf": {}, "fixed": {}}
    return small_study("seeded", tmp_path, **{"decomposers": ["tucker2", "svd"], "selectors": selectors,
                                               "strategies": {"finetune": {"epochs": 0}}, "trials": 3, **changes})


def space_of(config: dict[str, Any]) -> SearchSpace:
    cfg = load_config(config)
    assert cfg.model is not None
    model = rankopt.model(cfg.model.name, num_classes=10, in_channels=1, **cfg.model.kwargs)
    return SearchSpace(cfg, model, rankopt.find_layers(model, (1, 1, 8, 8)))


def test_spread_value_positions_on_linear_log_int_and_categorical_scales() -> None:
    assert spread_value(FloatDistribution(0.6, 1.0), 0.25) == pytest.approx(0.7)
    assert spread_value(FloatDistribution(0.01, 1.0, log=True), 0.5) == pytest.approx(0.1)
    assert spread_value(IntDistribution(1, 9), 0.5) == 5
    assert spread_value(FloatDistribution(0.0, 1.0, step=0.25), 0.4) == pytest.approx(0.5)
    assert spread_value(CategoricalDistribution(["a", "b", "c"]), 0.99) == "c"


def test_proposals_hold_defaults_and_spread_points_for_every_selector(tmp_path: Any) -> None:
    space = space_of(study_dict(tmp_path))
    points = proposal_points(space, 2)
    by_selector: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        by_selector.setdefault(point["selector"], []).append(point)
    # energy: its default p = 0.95, then the centers of the two halves of [0.6, 0.99]
    assert [p["energy.p"] for p in by_selector["energy"]] == pytest.approx([0.95, 0.6975, 0.8925])
    # vbmf: plain VBMF (weakening 0, its default), then two spread weakenings
    assert [p["vbmf.weakening"] for p in by_selector["vbmf"]][0] == 0.0
    assert len(by_selector["vbmf"]) == 3
    assert len(by_selector["fixed"]) == 3
    dists = space.distributions()
    for point in points:
        # every point is a valid enqueue entry, with the first decomposer on every layer
        assert space.check_point(point, "seed") == point
        assert point["finetune.lr"] == 0.01  # the strategy's default, inside its range
        for layer, options in space.layer_options.items():
            if f"decomposer.{layer}" in dists:
                assert point[f"decomposer.{layer}"] == options[0] == "tucker2"
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)


def test_per_layer_fractions_get_one_shared_fraction(tmp_path: Any) -> None:
    config = study_dict(tmp_path, selectors={"fixed": {"space": {"per_layer": True}}})
    points = proposal_points(space_of(config), 3)
    assert len(points) == 3  # no default for per-layer keys, so only the spread points
    for point in points:
        fractions = {v for k, v in point.items() if k.startswith("fixed.fraction:")}
        assert len(fractions) == 1
    assert "selector" not in points[0]  # one selector: nothing to choose


def test_seed_proposals_option_validation(tmp_path: Any) -> None:
    assert load_config(study_dict(tmp_path, seed_proposals=True)).seed_proposals is True
    assert load_config(study_dict(tmp_path, seed_proposals=4)).seed_proposals == 4
    with pytest.raises(ConfigError, match="seed_proposals"):
        load_config(study_dict(tmp_path, seed_proposals=-1))


def test_seeded_study_runs_the_proposals_first(tmp_path: Any) -> None:
    config = study_dict(
        tmp_path,
        selectors={"energy": {"p": {"low": 0.6, "high": 0.99}}, "vbmf": {"weakening": 0.0}},
        seed_proposals=1,
        trials=3,
        sampler={"name": "random", "seed": 0},
    )
    result = rankopt.run_study(config, progress=False)
    trials = sorted(result.study.trials, key=lambda t: t.number)
    assert [t.params.get("selector") for t in trials] == ["energy", "energy", "vbmf"]
    assert trials[0].params["energy.p"] == pytest.approx(0.95)
    assert trials[1].params["energy.p"] == pytest.approx(0.795)
    # the proposals really ran: energy p = 0.95 keeps more than p = 0.795
    records = {r.trial: r for r in result.trials()}
    assert records[0].params > records[1].params
    assert all(math.isfinite(r.accuracy) for r in records.values())
