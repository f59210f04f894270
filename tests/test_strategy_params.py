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
        for edge in (dist.low, dist.high):  # type: ignore[attr-defined]
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
