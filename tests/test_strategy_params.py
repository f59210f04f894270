"""Hyperparameter validation of the paper strategies (nrmf, deeptwist, admm, tdlrt)."""

from __future__ import annotations

from typing import Any

import pytest
from optuna.distributions import BaseDistribution

import rankopt
from rankopt.core.errors import ConfigError
from rankopt.testing import assert_strategy

PAPER_STRATEGIES = ("nrmf", "deeptwist", "admm", "tdlrt")


class UntouchableContext:
    """A context that fails the test if a strategy uses it: bad params must fail first."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the strategy touched ctx.{name} before validating its params")


def test_registered_as_builtins() -> None:
    names = rankopt.plugin_names()["strategies"]
    assert set(PAPER_STRATEGIES) <= set(names)


@pytest.mark.parametrize("name", PAPER_STRATEGIES)
def test_defaults_and_search_space_are_valid(name: str) -> None:
    strategy = rankopt.strategy(name)
    space = strategy.search_space()
    assert space and all(isinstance(d, BaseDistribution) for d in space.values())
    assert set(space) <= set(strategy.defaults())
    checked = strategy.validate_params({})
    assert checked == {**strategy.defaults(), **checked}
    # every value at the edges of the default search space is accepted
    for key, dist in space.items():
        edges = dist.choices if hasattr(dist, "choices") else (dist.low, dist.high)  # type: ignore[attr-defined]
        for edge in edges:
            strategy.validate_params({key: edge})


@pytest.mark.parametrize("name", PAPER_STRATEGIES)
def test_unknown_hyperparameter_is_named(name: str) -> None:
    with pytest.raises(ConfigError, match="'alhpa'") as err:
        rankopt.strategy(name).run(UntouchableContext(), {"alhpa": 0.1})  # type: ignore[arg-type]
    # the message lists the known names so the user can fix the typo
    for known in rankopt.strategy(name).defaults():
        assert known in str(err.value)


BAD_VALUES = [
    ("nrmf", "alpha", -0.01),
    ("nrmf", "lr", 0.0),
    ("nrmf", "epochs", -1),
    ("nrmf", "finetune_epochs", "2"),
    ("deeptwist", "distortion_steps", 0),
    ("deeptwist", "distortion_steps", 2.5),
    ("deeptwist", "reselect", "yes"),
    ("deeptwist", "lr", float("nan")),
    ("admm", "rho", 0.0),
    ("admm", "tol", 1.5),
    ("admm", "tol", 0.0),
    ("admm", "update_interval", 0),
    ("admm", "epochs", True),
    ("tdlrt", "tau", 0.0),
    ("tdlrt", "tau", 1.0),
    ("tdlrt", "initial_rank_fraction", 0.0),
    ("tdlrt", "initial_rank_fraction", 1.2),
    ("tdlrt", "min_rank", 0),
    ("tdlrt", "init", "zeros"),
]


@pytest.mark.parametrize(("name", "key", "value"), BAD_VALUES)
def test_out_of_range_value_fails_before_work(name: str, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        rankopt.strategy(name).run(UntouchableContext(), {key: value})  # type: ignore[arg-type]
    message = str(err.value)
    assert repr(name) in message and repr(key) in message and repr(value) in message


@pytest.mark.parametrize("name", PAPER_STRATEGIES)
def test_passes_the_strategy_contract(name: str) -> None:
    # a tiny trial on CPU: valid spec, model matching it, finite logits, JSON extras
    assert_strategy(rankopt.strategy(name))


@pytest.mark.parametrize("name", PAPER_STRATEGIES)
def test_the_paper_preset_fixes_the_papers_recipe_without_distillation(name: str) -> None:
    strategy = rankopt.strategy(name)
    paper = strategy.validate_params({"preset": "paper"})
    default = strategy.validate_params({})
    assert paper != default
    assert paper.get("distill_weight", 0.0) == 0.0 and paper.get("distill_features", 0.0) == 0.0
    # a value the study fixes beats the preset's
    assert strategy.validate_params({"preset": "paper", "lr": 0.5})["lr"] == 0.5
    # the preset's own space: fixed values are not searched
    space = strategy.search_space_for({"preset": "paper"})
    assert not set(space) & {k for k, v in strategy.paper_preset().items()}
    with pytest.raises(ConfigError, match="'preset' must be one of .*got 'papr'"):
        strategy.validate_params({"preset": "papr"})


def test_the_paper_presets_hold_the_papers_numbers() -> None:
    nrmf = rankopt.strategy("nrmf").validate_params({"preset": "paper"})
    assert (nrmf["alpha"], nrmf["lr"], nrmf["epochs"]) == (1e-2, 1e-4, 50.0)
    admm = rankopt.strategy("admm").validate_params({"preset": "paper"})
    assert (admm["schedule"], admm["rho"], admm["lr"]) == ("epoch", 1e-3, 0.1)
    assert rankopt.strategy("tdlrt").validate_params({"preset": "paper"})["init"] == "random"
    space = rankopt.strategy("deeptwist").search_space_for({"preset": "paper"})
    assert (space["distortion_steps"].low, space["distortion_steps"].high) == (100, 5000)


def test_a_study_with_the_paper_preset_checks_and_samples_its_space() -> None:
    from rankopt.config.checks import _check_plugin_params
    from rankopt.search.space import _method_space

    strategy = rankopt.strategy("deeptwist")
    _check_plugin_params(strategy, "strategy", "deeptwist", {"preset": "paper"}, "strategies.deeptwist")
    space = _method_space({"preset": "paper"}, strategy.search_space_for({"preset": "paper"}), "x")
    assert space.fixed == {"preset": "paper"} and set(space.searched) == {"distortion_steps", "lr"}
