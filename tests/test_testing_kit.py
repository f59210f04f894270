"""rankopt.testing: every registered plugin passes the contract, and each check catches its defect.

The parametrized tests pick up every decomposer, rank selector and strategy that is
registered when the suite is collected (built-ins and installed distributions alike).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn as nn
from fixtures.plugin_env import plugin_env  # noqa: F401  (pytest fixture)
from optuna.distributions import FloatDistribution

import rankopt
from rankopt.cli import main
from rankopt.plugins.decomposers.svd import SVDDecomposer
from rankopt.plugins.selectors.fixed import FixedRankSelector
from rankopt.plugins.strategies.finetune import FineTuneStrategy
from rankopt.testing import (
    CheckResult,
    assert_decomposer,
    assert_rank_selector,
    assert_strategy,
    check_decomposer,
    check_installed_plugins,
    check_rank_selector,
    check_strategy,
)
from rankopt.testing.selectors import space_corners

rankopt.reset_registry()
REGISTERED = rankopt.plugin_names()



def failed(results: list[CheckResult]) -> dict[str, str]:
    return {r.check: r.reason for r in results if not r.passed}


# -- every registered plugin honours the contract --------------------------------------


@pytest.mark.parametrize("name", REGISTERED["decomposers"])
def test_registered_decomposer_honours_the_contract(name: str) -> None:
    assert_decomposer(rankopt.decomposer(name))


@pytest.mark.parametrize("name", REGISTERED["rank_selectors"])
def test_registered_rank_selector_honours_the_contract(name: str) -> None:
    assert_rank_selector(rankopt.rank_selector(name))


@pytest.mark.parametrize("name", REGISTERED["strategies"])
def test_registered_strategy_honours_the_contract(name: str) -> None:
    assert_strategy(rankopt.strategy(name))


def test_a_third_party_plugin_passes_the_same_checks(plugin_env) -> None:  # noqa: F811
    plugin_env.activate("good")
    import rankopt_fixture_good as good

    assert_decomposer(good.LowRankLinearDecomposer())
    assert_rank_selector(good.HalfRankSelector(), rankopt.decomposer("tucker2"))
    assert_rank_selector(good.HalfRankSelector(), good.LowRankLinearDecomposer())
    assert_strategy(good.CompressOnlyStrategy())


def test_checks_leave_the_callers_random_state_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    check_decomposer(SVDDecomposer())
    assert torch.equal(torch.get_rng_state(), state)


# -- each decomposer check catches the defect it is about --------------------------------


class OffByOneCost(SVDDecomposer):
    def cost(self, module, ranks, input_hw=None, options=None):
        c = super().cost(module, ranks, input_hw, options)
        return rankopt.Cost(c.params + 1, c.flops)


class DtypeChangingProject(SVDDecomposer):
    def project(self, weight, ranks, options=None):
        return super().project(weight, ranks, options).float()


class InPlaceProject(SVDDecomposer):
    def project(self, weight, ranks, options=None):
        out = super().project(weight, ranks, options)
        weight.mul_(1.0)
        weight.add_(1e-3)
        return out


class NoisyProject(SVDDecomposer):
    def project(self, weight, ranks, options=None):
        return super().project(weight, ranks, options) * 1.01


class LaxRanks(SVDDecomposer):
    def check_ranks(self, module, ranks, *, name=None, options=None):
        return tuple(ranks) if not isinstance(ranks, int) else (ranks,)


class IgnoresWeights(SVDDecomposer):
    def build(self, module, ranks, *, options=None, initialize=True):
        return super().build(module, ranks, options=options, initialize=False)


class UninitializedDiffers(SVDDecomposer):
    def build(self, module, ranks, *, options=None, initialize=True):
        built = super().build(module, ranks, options=options, initialize=initialize)
        if not initialize:
            built.register_buffer("scale", torch.ones(1))
        return built


class AcceptsAnything(SVDDecomposer):
    def unsupported_reason(self, module):
        return None


@pytest.mark.parametrize(
    ("broken", "check", "says", "also"),
    [
        (OffByOneCost, "cost_matches_built", "cost() says Cost(params=", set()),
        (DtypeChangingProject, "project_shape_dtype", "changed the dtype torch.float64 -> torch.float32", set()),
        (InPlaceProject, "project_shape_dtype", "modified its input in place", set()),
        # scaling by 1.01 also spoils exactness at full rank
        (NoisyProject, "project_idempotent", "project(project(W)) differs from project(W)", {"project_full_rank"}),
        (LaxRanks, "check_ranks_rejects_invalid", "check_ranks accepted invalid ranks (0,)", set()),
        (IgnoresWeights, "full_rank_equivalence", "differs from the layer's by", {"build_matches_projection"}),
        (UninitializedDiffers, "build_uninitialized", "state_dict keys differ", set()),
        (AcceptsAnything, "refuses_unsupported", "supports() accepted every probe", set()),
    ],
)
def test_each_decomposer_check_catches_its_defect(broken: type, check: str, says: str, also: set[str]) -> None:
    modules = {"conv": nn.Conv2d(4, 6, 3, padding=1), "linear": nn.Linear(6, 5)}
    problems = failed(check_decomposer(broken(), modules, input_hw=(5, 5)))
    assert set(problems) == {check} | also, problems
    assert says in problems[check]


def test_decomposer_checks_report_an_empty_sample_set() -> None:
    problems = failed(check_decomposer(SVDDecomposer(), [nn.BatchNorm2d(3)]))
    assert "supports() rejects every sample layer" in problems["sample_layers"]


def test_declared_inexact_projections_get_the_weaker_idempotence_check() -> None:
    class DeclaredInexact(NoisyProject):
        projection_idempotent = False

    modules = {"linear": nn.Linear(6, 5)}
    assert "project_idempotent" in failed(check_decomposer(NoisyProject(), modules))
    assert "project_idempotent" not in failed(check_decomposer(DeclaredInexact(), modules))


# -- selector checks -----------------------------------------------------------------------


class ZeroRanks(FixedRankSelector):
    def select(self, module, decomposer, **kwargs):
        ranks = super().select(module, decomposer, **kwargs)
        return tuple(0 for _ in ranks)


class DropsUnknown(FixedRankSelector):
    def validate_params(self, params):
        return super().validate_params({k: v for k, v in params.items() if k in self.defaults()})

    def select(self, module, decomposer, *, cache=None, name=None, options=None, **params):
        known = {k: v for k, v in params.items() if k in self.defaults()}
        return super().select(module, decomposer, cache=cache, name=name, options=options, **known)


class TupleSpace(FixedRankSelector):
    def search_space(self, layers=(), **options):
        return {"fraction": (0.1, 0.9)}


class Nondeterministic(FixedRankSelector):
    def select(self, module, decomposer, **kwargs):
        super().select(module, decomposer, **kwargs)
        return tuple(random.randint(1, hi) for hi in decomposer.max_ranks(module))


@pytest.mark.parametrize(
    ("broken", "check", "says"),
    [
        (ZeroRanks, "ranks_within_bounds", "outside [1,"),
        (DropsUnknown, "rejects_unknown_params", "accepted an unknown parameter 'no_such_parameter_xyz'"),
        (TupleSpace, "search_space", "must be an Optuna distribution, got tuple"),
        (Nondeterministic, "ranks_within_bounds", "is not deterministic"),
    ],
)
def test_each_selector_check_catches_its_defect(broken: type, check: str, says: str) -> None:
    random.seed(0)
    problems = failed(check_rank_selector(broken()))
    assert set(problems) == {check}, problems
    assert says in problems[check]


def test_space_corners_vary_one_distribution_at_a_time() -> None:
    space = {"a": FloatDistribution(0.0, 1.0), "b": FloatDistribution(1e-4, 1e-2, log=True)}
    corners = space_corners(space)
    assert corners[0] == {"a": 0.5, "b": pytest.approx(1e-3)}
    assert {"a": 0.0, "b": pytest.approx(1e-3)} in corners and {"a": 1.0, "b": pytest.approx(1e-3)} in corners
    assert len(corners) == 5


# -- strategy checks -------------------------------------------------------------------------


class SpecMismatch(FineTuneStrategy):
    def run(self, ctx, params):
        outcome = super().run(ctx, {**params, "epochs": 0})
        return rankopt.TrialOutcome(model=ctx.model(), spec=outcome.spec)


class DropsUnknownHyperparameter(FineTuneStrategy):
    def validate_params(self, params):
        return super().validate_params({k: v for k, v in params.items() if k in self.defaults()})


class DefaultOutsideSpace(FineTuneStrategy):
    def defaults(self):
        return {**super().defaults(), "lr": 10.0}


class UnstorableExtra(FineTuneStrategy):
    def run(self, ctx, params):
        outcome = super().run(ctx, {**params, "epochs": 0})
        outcome.extra["layer"] = nn.Linear(1, 1)
        return outcome


@pytest.mark.parametrize(
    ("broken", "check", "says", "run"),
    [
        (SpecMismatch, "run_tiny_trial", "does not match its spec", True),
        (UnstorableExtra, "run_tiny_trial", "TrialOutcome.extra must be JSON-serializable", True),
        (DropsUnknownHyperparameter, "rejects_unknown_params", "accepted an unknown hyperparameter", False),
        (DefaultOutsideSpace, "defaults", "default lr=10.0 lies outside its search space", False),
    ],
)
def test_each_strategy_check_catches_its_defect(broken: type, check: str, says: str, run: bool) -> None:
    problems = failed(check_strategy(broken(), run=run))
    assert set(problems) == {check}, problems
    assert says in problems[check]


# -- installed plugins and the CLI ---------------------------------------------------------------


class MisnamedSelector(FixedRankSelector):
    name = "fixed"  # registered below as "fixed_alias"


class MisnamedPlugin:
    __name__ = "misnamed_plugin"

    @rankopt.hookimpl
    def rankopt_rank_selectors(self):
        return [rankopt.RankSelectorInfo("fixed_alias", MisnamedSelector, "registered under another name")]


def test_check_installed_plugins_rows_and_a_name_mismatch() -> None:
    rankopt.register_plugin(MisnamedPlugin())
    try:
        rows = check_installed_plugins(("rank_selector",))
    finally:
        rankopt.reset_registry()
    assert all(set(r) == {"family", "name", "distribution", "check", "passed", "skipped", "reason"} for r in rows)
    assert {r["family"] for r in rows} == {"rank selector"}
    assert {r["name"] for r in rows} >= set(REGISTERED["rank_selectors"]) | {"fixed_alias"}
    bad = [r for r in rows if not r["passed"]]
    assert [(r["name"], r["check"]) for r in bad] == [("fixed_alias", "registered_name")]
    assert bad[0]["reason"] == "instance.name is 'fixed', registered as 'fixed_alias'"
    assert bad[0]["distribution"] == "(registered in-process)"


def test_check_installed_plugins_refuses_an_unknown_family() -> None:
    with pytest.raises(rankopt.ConfigError, match="cannot check plugin family 'datasets'"):
        check_installed_plugins(("datasets",))
    with pytest.raises(rankopt.UnknownNameError, match="unknown plugin family 'selectors'"):
        check_installed_plugins(("selectors",))


class ZeroRanksPlugin:
    __name__ = "zero_ranks_plugin"

    @rankopt.hookimpl
    def rankopt_rank_selectors(self):
        class Zero(ZeroRanks):
            name = "zero_ranks"

        return [rankopt.RankSelectorInfo("zero_ranks", Zero, "always rank 0")]


def test_rankopt_plugins_check_prints_a_table_and_exits_1_on_a_failure(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    rankopt.reset_registry()
    capsys.readouterr()
    assert main(["plugins", "--check", "--family", "rank_selectors"]) == 0
    text = capsys.readouterr().out
    assert "contract checks" in text and "ranks_within_bounds" in text and "FAIL" not in text

    rankopt.register_plugin(ZeroRanksPlugin())
    try:
        assert main(["plugins", "--check", "--family", "rank_selectors", "--format", "json"]) == 1
        out = json.loads(capsys.readouterr().out)
        rows = out["checks"]
        # checked with every installed decomposer (fixed-like selectors claim them all)
        assert [(r["name"], r["check"]) for r in rows if not r["passed"]] == [
            ("zero_ranks", f"ranks_within_bounds [{d}]") for d in REGISTERED["decomposers"]
        ]
        skipped = sum(r["skipped"] for r in rows)
        assert out["summary"] == f"{len(rows)} checks, {len(REGISTERED['decomposers'])} failed, {skipped} skipped"
        assert main(["plugins", "--check", "--family", "rank_selectors"]) == 1
        lines = capsys.readouterr().out.splitlines()
        line = next(ln for ln in lines if "zero_ranks" in ln and "FAIL" in ln)
        assert "ranks_within_bounds [" in line
        assert lines[-1] == out["summary"]
    finally:
        rankopt.reset_registry()


def test_family_without_check_filters_the_listing(capsys) -> None:
    assert main(["plugins", "--family", "decomposers"]) == 0
    out = capsys.readouterr().out
    assert "tucker2" in out and "small_cnn" not in out and "digits" not in out
    assert main(["plugins", "--family", "decomposer"]) == 2
    assert "--family must be one of" in capsys.readouterr().err
