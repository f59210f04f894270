"""Better fronts for the same compute (issue 18): repeats, distillation, multi-fidelity,
a search space that reaches 64x and rank 1, and the uniform rate sweep baseline."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from optuna.study import StudyDirection
from torch.utils.data import TensorDataset

import rankopt
from rankopt.config.schema import load_config
from rankopt.training.distill import Distillation, distillation_loss
from rankopt.core.errors import ConfigError
from rankopt.search.fidelity import promotion_order
from rankopt.search.seeding import UNIFORM_RATES, uniform_proposals, uniform_rate_point
from rankopt.search.space import SearchSpace
from rankopt.training.loop import make_loader, train
from study_support import RANDOM, small_study


def study(tmp_path: Path, **changes: Any) -> dict[str, Any]:
    return small_study("compute", tmp_path, **{"selectors": {"fixed": {"fraction": {"low": 0.1, "high": 1.0}}},
                                                "strategies": {"finetune": {"epochs": 0.2, "lr": 0.01}}, "sampler": RANDOM,
                                                **changes})


# -- 1. no repeated work --------------------------------------------------------------------


def test_a_trial_whose_ranks_round_like_an_earlier_ones_reports_its_result(tmp_path: Path) -> None:
    # the layers of small_cnn(width=8) are at most 48 wide, where ceil(0.49 r) == ceil(0.5 r)
    points = [{"fixed.fraction": 0.5}, {"fixed.fraction": 0.49}, {"fixed.fraction": 0.25}]
    result = rankopt.run_study(study(tmp_path, trials=3, enqueue=points), progress=False)
    records = {r.trial: r for r in result.trials()}
    assert records[0].spec == records[1].spec != records[2].spec
    assert [records[n].repeat_of for n in range(3)] == [None, 0, None]
    assert records[1].accuracy == records[0].accuracy and records[1].params == records[0].params
    assert records[1].train_epochs == 0.0 < records[0].train_epochs  # nothing trained again
    assert records[1].model_path == records[0].model_path
    assert result.status()["repeats"] == 1
    front = [r.trial for r in result.front()]
    assert 1 not in front and len(front) == len({(r.params, r.accuracy) for r in result.front()})


def test_hyperparameters_one_rounding_step_apart_have_one_repeat_key() -> None:
    # NSGA-II's crossover on a log scale turned the lr 0.05 of a trial into 0.05000000000000001
    # (the quickstart front listed both); Optuna's enqueue already treats them as equal
    from rankopt.search.repeats import rounded as _rounded

    a = {"hyperparameters": {"lr": 0.05, "epochs": 4}, "selector_params": {"p": [0.6]}}
    b = {"hyperparameters": {"lr": 0.05000000000000001, "epochs": 4}, "selector_params": {"p": [0.6]}}
    assert a != b and _rounded(a) == _rounded(b)
    assert _rounded({"lr": 0.051}) != _rounded({"lr": 0.05})


def test_skip_repeats_off_trains_every_trial(tmp_path: Path) -> None:
    points = [{"fixed.fraction": 0.5}, {"fixed.fraction": 0.49}]
    result = rankopt.run_study(study(tmp_path, trials=2, enqueue=points, skip_repeats=False),
                               progress=False)
    assert [r.repeat_of for r in result.trials()] == [None, None]
    assert all(r.train_epochs > 0 for r in result.trials())
    assert result.status()["repeats"] == 0


# -- 2. distillation -----------------------------------------------------------------------


def test_distillation_loss_is_hintons_formula() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    labels = torch.randint(0, 5, (6,))
    T, lam = 3.0, 0.7
    p = F.softmax(teacher / T, dim=1)
    kl = (p * (p.log() - F.log_softmax(student / T, dim=1))).sum(dim=1).mean()
    expected = (1 - lam) * F.cross_entropy(student, labels) + lam * T * T * kl
    got = distillation_loss(student, teacher, labels, temperature=T, weight=lam)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(distillation_loss(student, teacher, labels, temperature=T, weight=0.0)) == \
        pytest.approx(float(F.cross_entropy(student, labels)))
    # a student that equals its teacher has no soft loss: only the weighted hard term is left
    same = distillation_loss(teacher, teacher, labels, temperature=T, weight=lam)
    assert float(same) == pytest.approx((1 - lam) * float(F.cross_entropy(teacher, labels)), abs=1e-6)


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_train_with_distillation_minimizes_the_formula_with_feature_matching() -> None:
    torch.manual_seed(0)
    teacher, student = _net(), _net()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loader = make_loader(TensorDataset(x, y), batch_size=16)
    distill = Distillation(teacher, weight=0.5, temperature=2.0, features=0.3, layers=("0",))
    # lr 0: one step reports the loss of the untouched student
    result = train(student, loader, epochs=1, lr=0.0, distill=distill, device="cpu", seed=0)
    with torch.no_grad():
        expected = distillation_loss(student(x), teacher(x), y, temperature=2.0, weight=0.5)
        expected = expected + 0.3 * F.mse_loss(student[0](x), teacher[0](x))
    assert result.final_loss == pytest.approx(float(expected), rel=1e-5)
    assert not distill._handles  # hooks removed after training
    plain = train(student, loader, epochs=1, lr=0.0, device="cpu", seed=0)
    with torch.no_grad():
        assert plain.final_loss == pytest.approx(float(F.cross_entropy(student(x), y)), rel=1e-5)


def test_finetune_strategy_takes_distillation_and_checks_it(tmp_path: Path) -> None:
    strategy = rankopt.strategy("finetune")
    assert strategy.validate_params({"distill_weight": 0.5})["distill_temperature"] == 4.0
    for bad in ({"distill_weight": 1.5}, {"distill_temperature": 0}, {"distill_features": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            strategy.validate_params(bad)
    for name in ("nrmf", "admm", "deeptwist"):
        assert rankopt.strategy(name).validate_params({"distill_weight": 0.3})["distill_weight"] == 0.3
    # searchable: a range in the study file is a searched parameter
    result = rankopt.run_study(
        study(tmp_path, trials=2, strategies={"finetune": {
            "epochs": 0.2, "lr": 0.01, "distill_weight": {"low": 0.1, "high": 0.9},
            "distill_temperature": {"low": 1.0, "high": 8.0}}}),
        progress=False)
    for record in result.trials():
        assert 0.1 <= record.hyperparameters["distill_weight"] <= 0.9
        assert 1.0 <= record.hyperparameters["distill_temperature"] <= 8.0


def test_fine_tuning_strategies_distill_by_default_and_a_bare_train_call_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import rankopt.training.loop
    from rankopt.testing.strategies import tiny_trial_context

    for name in ("finetune", "nrmf", "admm", "deeptwist"):
        hp = rankopt.strategy(name).validate_params({})
        assert (hp["distill_weight"], hp["distill_temperature"], hp["distill_features"]) == (0.5, 4.0, 0.0)
    seen: list[Any] = []
    real = rankopt.training.loop.train

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("distill"))
        return real(*args, **kwargs)

    monkeypatch.setattr(rankopt.training.loop, "train", spy)
    ctx = tiny_trial_context(max_steps=1)
    model = ctx.compress(ctx.model(), ctx.select_ranks(ctx.model()))
    ctx.train(model, epochs=1, lr=0.01)  # a strategy that never heard of distillation
    rankopt.strategy("finetune").run(ctx, {"epochs": 1, "lr": 0.01})  # the defaults: on
    ctx.train(model, epochs=1, lr=0.01, distill_weight=0.0)
    assert seen[0] is None and seen[-1] is None
    assert isinstance(seen[1], Distillation) and (seen[1].weight, seen[1].temperature) == (0.5, 4.0)


# -- 3. multi-fidelity ------------------------------------------------------------------------


def test_promotion_picks_the_non_dominated_first() -> None:
    directions = [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE]  # accuracy, params
    values = [(0.90, 100), (0.95, 200), (0.85, 150), (0.80, 50), (0.94, 300)]
    # front: 0, 1, 3 (2 is dominated by 0; 4 by 1); then rank 1: 2 and 4
    assert sorted(promotion_order(values, directions, 3)) == [0, 1, 3]
    # two of the front: against the worst point (acc 0.80, 300 params) 0's box is 0.10 x 200,
    # 1's 0.15 x 100 (5 of it not covered by 0's), 3's 0 x 250: 0, then 1
    assert promotion_order(values, directions, 2) == [0, 1]
    # the whole front, then of rank 1 the point with the larger box (2: 0.05 x 150; 4: 0.14 x 0)
    assert promotion_order(values, directions, 4) == [0, 1, 3, 2]
    assert promotion_order([], directions, 2) == []


def test_multi_fidelity_continues_the_front_from_its_checkpoints(tmp_path: Path) -> None:
    points = [{"fixed.fraction": f} for f in (0.2, 0.4, 0.6, 0.8)]
    config = study(tmp_path, trials=4, enqueue=points,
                   multi_fidelity={"rounds": 1, "epochs": 0.5, "keep": 0.5})
    result = rankopt.run_study(config, progress=False)
    records = result.trials()
    first = [r for r in records if r.fidelity == 0]
    later = [r for r in records if r.fidelity == 1]
    assert len(first) == 4 and len(later) == 2  # ceil(0.5 * 4)
    picked = promotion_order(
        [(r.accuracy, r.params, r.flops) for r in first],
        [StudyDirection.MAXIMIZE, StudyDirection.MINIMIZE, StudyDirection.MINIMIZE], 2)
    assert sorted(r.continued_from for r in later) == sorted(first[i].trial for i in picked)
    by_trial = {r.trial: r for r in records}
    for r in later:
        source = by_trial[r.continued_from]  # type: ignore[index]
        assert (r.spec, r.params, r.flops) == (source.spec, source.params, source.flops)
        assert r.train_epochs == pytest.approx(0.5, abs=0.1)
        assert Path(r.model_path).is_file()
    front = result.front()
    assert not {r.trial for r in front} & {r.continued_from for r in later}
    status = result.status()
    assert sum(status["front_fidelity"].values()) == len(front)
    # a rerun promotes nothing again
    again = rankopt.run_study(config, progress=False)
    assert len(again.trials()) == 6


def test_by_default_a_finetune_study_spends_its_epochs_in_two_rungs(tmp_path: Path) -> None:
    from rankopt.config.schema import AUTO_MF_MIN_TRIALS

    n = AUTO_MF_MIN_TRIALS
    points = [{"fixed.fraction": 0.1 + 0.1 * i} for i in range(n)]
    config = study(tmp_path, trials=n, enqueue=points, strategies={"finetune": {"epochs": 0.4, "lr": 0.01}})
    mf = load_config(config).multi_fidelity
    assert mf is not None and not isinstance(mf, str) and (mf.first, mf.keep, mf.epochs) == (0.5, 0.5, None)
    records = rankopt.run_study(config, progress=False).trials()
    first = [r for r in records if r.fidelity == 0]
    later = [r for r in records if r.fidelity == 1]
    assert len(first) == n and len(later) == n // 2
    assert all(r.hyperparameters["epochs"] == pytest.approx(0.2) for r in first)  # half the epochs
    for r in first + later:  # train_epochs counts what the loader ran: whole batches
        assert r.train_epochs == pytest.approx(0.2 if r.fidelity == 0 else 0.4, abs=0.05)
    # the same epochs as without multi-fidelity, n * 0.4, up to a batch per trial
    assert sum(r.train_epochs for r in records) == pytest.approx(n * 0.4, rel=0.1)
    # `trials` counts searched models, not continuations: 2 more run (before, the n // 2
    # continuations counted and none did), then the larger rung's promotions
    again = rankopt.run_study({**config, "trials": n + 2}, progress=False).trials()
    assert len([r for r in again if r.fidelity == 0]) == n + 2
    assert len([r for r in again if r.fidelity == 1]) >= n // 2


def test_multi_fidelity_auto_is_off_for_small_studies_other_strategies_and_no_fine_tuning(
    tmp_path: Path,
) -> None:
    from rankopt.config.schema import AUTO_MF_MIN_TRIALS

    n = AUTO_MF_MIN_TRIALS
    assert load_config(study(tmp_path, trials=n - 1)).multi_fidelity is None
    assert load_config(study(tmp_path, trials=n, strategies=["finetune", "nrmf"])).multi_fidelity is None
    assert load_config(study(tmp_path, trials=n, strategies={"finetune": {"epochs": 0}})).multi_fidelity is None
    assert load_config(study(tmp_path, trials=n, multi_fidelity=None)).multi_fidelity is None
    explicit = load_config(study(tmp_path, trials=n, multi_fidelity={"epochs": 3})).multi_fidelity
    assert explicit is not None and not isinstance(explicit, str) and explicit.first is None
    assert explicit.continuation_epochs(1.0) == 3.0
    # the resolved form is what the run directory keeps, and it loads back the same
    dumped = load_config(study(tmp_path, trials=n)).model_dump()
    assert dumped["multi_fidelity"] == {"rounds": 1, "epochs": None, "keep": 0.5, "first": 0.5}
    again = load_config({**dumped, "multi_fidelity": dumped["multi_fidelity"]}).multi_fidelity
    assert again is not None and not isinstance(again, str) and again.split
    with pytest.raises(ConfigError, match="multi_fidelity.first splits the finetune strategy's epochs"):
        load_config(study(tmp_path, trials=n, strategies=["finetune", "nrmf"], multi_fidelity={"first": 0.5}))
    with pytest.raises(ConfigError, match="rounds: 2 with first and no epochs"):
        load_config(study(tmp_path, trials=n, multi_fidelity={"first": 0.5, "rounds": 2}))


def test_a_running_continuation_is_not_failed_as_stale_by_another_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # two processes on one study: the other's stale-trial check runs while this one trains
    # a continuation; a continuation that named no process was failed under it
    import optuna

    import rankopt.search.fidelity as fidelity
    from rankopt.search.storage import fail_stale_trials, worker_id

    real = fidelity.continue_trial
    failed: list[list[int]] = []
    workers: list[Any] = []

    def continue_and_check(env: Any, number: int, source: Any, level: int) -> dict[str, Any]:
        url = f"sqlite:///{env.run_dir / 'optuna.db'}"
        other = optuna.load_study(study_name=env.config.name, storage=url)
        failed.append(fail_stale_trials(other, other._storage, local=True))
        workers.append(other.trials[number].user_attrs.get("worker"))
        return real(env, number, source, level)

    monkeypatch.setattr(fidelity, "continue_trial", continue_and_check)
    points = [{"fixed.fraction": f} for f in (0.2, 0.6)]
    config = study(tmp_path, trials=2, enqueue=points,
                   multi_fidelity={"rounds": 1, "epochs": 0.2, "keep": 1.0})
    result = rankopt.run_study(config, progress=False)
    assert failed == [[], []] and workers == [worker_id()] * 2
    assert [r.fidelity for r in result.trials()] == [0, 0, 1, 1]


# -- 4. the search space reaches the extremes -----------------------------------------------


def _space(config: dict[str, Any]) -> tuple[SearchSpace, nn.Module, list[Any]]:
    from rankopt.study import Study

    prep = Study(config)._prepare()
    return prep.space, prep.model, prep.targets


def test_thin_first_conv_is_dense_by_default(tmp_path: Path) -> None:
    _, _, targets = _space(study(tmp_path))
    assert "0" not in [t.name for t in targets]  # the first conv: 1 input channel
    _, _, targets = _space(study(tmp_path, targets={"dense_input_channels": 0}))
    assert "0" in [t.name for t in targets]


def test_space_reaches_rank_one_and_64x(tmp_path: Path) -> None:
    for name, key in (("fixed", "fraction"), ("budget", "target"), ("energy", "p")):
        dist = rankopt.rank_selector(name).search_space([])[key]
        assert dist.log or name == "energy"
        assert {"fixed": dist.low * 1000 <= 1, "budget": dist.low <= 1 / 64,
                "energy": dist.low <= 0.3}[name]
    config = study(tmp_path, model={"name": "lenet5"}, decomposers=["tucker2", "svd"],
                   selectors={"fixed": {"space": {"per_layer": True}}})
    model = rankopt.model("lenet5", num_classes=10, in_channels=1)  # MNIST-sized: 28 x 28
    targets = [t for t in rankopt.find_layers(model, (1, 1, 28, 28)) if t.name != "conv1"]
    space = SearchSpace(load_config(config), model, targets)
    point = uniform_rate_point(space, model, 64.0)
    plan = space.plan(point)
    spec, _ = rankopt.compression.selection.select_spec(model, targets, plan.decomposers, "fixed",
                                            plan.selector_params, input_shape=(1, 1, 28, 28))
    for name, entry in spec.items():
        module = model.get_submodule(name)
        dec = rankopt.decomposer(entry["decomposer"])
        got = dec.cost(module, entry["ranks"], input_hw=(1, 1)).params
        original = sum(p.numel() for p in module.parameters())
        assert got <= original / 64 or all(r == 1 for r in entry["ranks"]), (name, got, original)
    # rank 1 everywhere at an absurd rate
    tiny = space.plan(uniform_rate_point(space, model, 1e6))
    spec, _ = rankopt.compression.selection.select_spec(model, targets, tiny.decomposers, "fixed",
                                            tiny.selector_params, input_shape=(1, 1, 28, 28))
    assert all(set(e["ranks"]) == {1} for e in spec.values())


def test_seed_proposals_include_the_uniform_sweep_with_the_classifier_full(tmp_path: Path) -> None:
    config = study(tmp_path, model={"name": "lenet5"}, decomposers=["tucker2", "svd"],
                   selectors={"fixed": {"space": {"per_layer": True}}, "vbmf": {}}, seed_proposals=1)
    model = rankopt.model("lenet5", num_classes=10, in_channels=1)
    targets = [t for t in rankopt.find_layers(model, (1, 1, 28, 28)) if t.name != "conv1"]
    space = SearchSpace(load_config(config), model, targets)
    points = uniform_proposals(space, model)
    assert len(points) == len(UNIFORM_RATES) == 5
    for rate, point in zip(UNIFORM_RATES, points):
        assert point["selector"] == "fixed" and point["fixed.fraction:fc_out"] == 1.0
        plan = space.plan(space.check_point(point, "proposal"))
        spec, _ = rankopt.compression.selection.select_spec(model, targets, plan.decomposers, "fixed",
                                                plan.selector_params, input_shape=(1, 1, 28, 28))
        assert "fc_out" not in spec  # full rank saves nothing: the classifier stays dense
        for name in ("conv2", "fcs.0"):
            module = model.get_submodule(name)
            got = rankopt.decomposer(spec[name]["decomposer"]).cost(module, spec[name]["ranks"],
                                                                    input_hw=(1, 1)).params
            assert got <= sum(p.numel() for p in module.parameters()) / rate
    # a study enqueues them after the selectors' proposals
    small = study(tmp_path, selectors={"fixed": {"space": {"per_layer": True}}, "vbmf": {}},
                  seed_proposals=1)
    prepared = rankopt.Study(small)._prepare()
    sweep = uniform_proposals(prepared.space, prepared.model)
    # small_cnn's narrow layers round two rates to the same ranks: one point each
    assert 3 <= len(sweep) <= 5 and prepared.enqueue[-len(sweep):] == sweep
    assert len(prepared.enqueue) > len(sweep)
    # without the per-layer fixed selector there is no sweep
    plain = study(tmp_path, model={"name": "lenet5"}, selectors={"vbmf": {}})
    assert uniform_proposals(SearchSpace(load_config(plain), model, targets), model) == []


def _low_rank_lenet() -> nn.Module:
    """LeNet-5 whose conv2, fcs.0 and classifier weights are rank 10, 30 and 8 plus faint
    noise, so VBMF finds ranks well above 1 (it finds pure noise, a random init, to be
    rank 0)."""
    torch.manual_seed(0)
    model = rankopt.model("lenet5", num_classes=10, in_channels=1)
    with torch.no_grad():
        for name, rank in (("conv2", 10), ("fcs.0", 30), ("fc_out", 8)):
            w = model.get_submodule(name).weight
            mat = w.reshape(w.shape[0], -1)
            low = torch.randn(mat.shape[0], rank) @ torch.randn(rank, mat.shape[1])
            w.copy_((low + 0.01 * torch.randn_like(mat)).reshape(w.shape) / mat.shape[1] ** 0.5)
    return model


def test_the_vbmf_sweep_cuts_the_classifier_too_and_gives_what_it_frees_to_the_other_layers(
    tmp_path: Path,
) -> None:
    from rankopt.search.seeding import SHRINK_RATES, anchored_proposals

    config = study(tmp_path, model={"name": "lenet5"}, decomposers=["tucker2", "svd"],
                   selectors={"fixed": {"space": {"per_layer": True}}, "vbmf": {}})
    model = _low_rank_lenet()
    targets = [t for t in rankopt.find_layers(model, (1, 1, 28, 28)) if t.name != "conv1"]
    space = SearchSpace(load_config(config), model, targets)
    first = {layer: options[0] for layer, options in space.layer_options.items()}
    vbmf, _ = rankopt.compression.selection.select_spec(model, targets, first, "vbmf", {})
    assert vbmf["conv2"]["ranks"][0] > 3 and vbmf["fcs.0"]["ranks"][0] > 10 and vbmf["fc_out"]["ranks"][0] >= 6

    def params(name: str, entry: dict[str, Any] | None) -> int:
        module = model.get_submodule(name)
        if entry is None:
            return sum(p.numel() for p in module.parameters())
        return rankopt.decomposer(entry["decomposer"]).cost(module, entry["ranks"], input_hw=(1, 1)).params

    def resolved(point: dict[str, Any]) -> dict[str, Any]:
        plan = space.plan(space.check_point(point, "proposal"))
        return rankopt.compression.selection.select_spec(model, targets, plan.decomposers, "fixed", plan.selector_params)[0]

    points = anchored_proposals(space, model, targets)
    assert len(points) == len(SHRINK_RATES) == 3
    sizes = []
    for rate, point in zip(SHRINK_RATES, points):
        assert point["selector"] == "fixed"
        spec = resolved(point)
        # the point before the rebalancing: every layer but the classifier cut by rate
        kept = resolved({**point, **_fractions_at(space, model, {
            n: params(n, vbmf.get(n)) / (1.0 if n == "fc_out" else rate) for n in first})})
        assert kept.get("fc_out") == vbmf.get("fc_out")
        total = sum(params(n, spec.get(n)) for n in first)
        budget = sum(params(n, kept.get(n)) for n in first)
        assert budget - 200 <= total <= budget, (rate, total, budget)  # the same params, a step at most
        assert params("fc_out", spec.get("fc_out")) <= params("fc_out", vbmf["fc_out"]) / rate
        for name in ("conv2", "fcs.0"):  # what the classifier frees goes to the others
            assert params(name, spec.get(name)) >= params(name, kept.get(name)), (rate, name)
        assert sum(params(n, spec.get(n)) > params(n, kept.get(n)) for n in ("conv2", "fcs.0")) >= 1
        sizes.append(total)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 3
    # only with both vbmf and the per-layer fixed selector
    for selectors in ({"fixed": {"space": {"per_layer": True}}}, {"fixed": {}, "vbmf": {}}):
        other = SearchSpace(load_config(study(tmp_path, model={"name": "lenet5"}, selectors=selectors)),
                            model, targets)
        assert anchored_proposals(other, model, targets) == []


def _fractions_at(space: Any, model: nn.Module, caps: dict[str, float]) -> dict[str, Any]:
    from rankopt.search.seeding import uniform_rate_point

    return uniform_rate_point(space, model, 1.0, allowed=caps)


def test_rebalancing_keeps_the_total_and_spends_the_remainder_cheapest_step_first() -> None:
    from rankopt.search.seeding import rebalanced_caps

    ten = [(k / 10, 10 * k) for k in range(1, 11)]  # params 10, 20, ..., 100
    steps = {"a": ten, "b": ten, "head": ten}
    anchor = {"a": 100.0, "b": 100.0, "head": 100.0}
    # before: a and b cut 2x (50 each), head kept (100): 200 params. After: head 50, a and b
    # at the smallest common rate that fits (100 / 1.25 = 80 each is 210, so 70 each), then
    # one 10-param step more for the first of the two
    assert rebalanced_caps(steps, anchor, "head", 2.0) == {"a": 80.0, "b": 70.0, "head": 50.0}
    # a layer whose next step is cheaper gets the remainder
    fine = [(k / 40, 2.5 * k) for k in range(1, 41)]
    assert rebalanced_caps({**steps, "b": fine}, anchor, "head", 2.0) == {"a": 70.0, "b": 80.0, "head": 50.0}
    # rate 1: nothing moves
    assert rebalanced_caps(steps, anchor, "head", 1.0) == {"a": 100.0, "b": 100.0, "head": 100.0}


def test_a_study_enqueues_the_vbmf_sweep_after_the_other_proposals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rankopt.search.seeding as seeding

    config = study(tmp_path, selectors={"fixed": {"space": {"per_layer": True}}, "vbmf": {}})
    prepared = rankopt.Study(config)._prepare()
    n = len(prepared.enqueue)  # the selectors' proposals and the uniform sweep
    seen: list[dict[str, torch.Tensor]] = []
    sweep = [{"selector": "fixed", "fixed.fraction:3": 0.3, "fixed.fraction:7": f} for f in (0.7, 0.5)]

    def fake(space: Any, reference: nn.Module, targets: Any, **options: Any) -> list[dict[str, Any]]:
        seen.append({k: v.clone() for k, v in reference.state_dict().items()})
        assert options["min_saving"] == 0.1 and options["min_in_channels"] == 4
        return [*sweep, prepared.enqueue[0]]  # a point already enqueued runs once

    monkeypatch.setattr(seeding, "anchored_proposals", fake)
    result = rankopt.run_study({**config, "trials": n + 3}, progress=False)
    trials = sorted(result.study.trials, key=lambda t: t.number)
    assert [{k: t.params[k] for k in sweep[0]} for t in trials[n:n + 2]] == sweep
    assert trials[n + 2].params != prepared.enqueue[0]
    saved = torch.load(tmp_path / "run" / "reference" / "model.pt", weights_only=True)
    assert len(seen) == 1 and all(torch.equal(seen[0][k], saved[k]) for k in saved)  # the trained one


def test_proposals_beyond_the_trial_budget_are_not_left_waiting(tmp_path: Path) -> None:
    import optuna

    config = study(tmp_path, selectors={"fixed": {"space": {"per_layer": True}}, "vbmf": {}},
                   trials=2)
    assert load_config(config).seed_proposals is True  # on by default
    assert len(rankopt.Study(config)._prepare().enqueue) > 2
    result = rankopt.run_study(config, progress=False)
    states = [t.state for t in result.study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2  # no WAITING leftovers


def test_uniform_sweep_baseline_has_one_point_per_rate(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _baselines as b

    absent = b.missing_data(b.settings(True)["mnist"])
    if absent:  # a user's clone: the study config is validated against the real archives
        pytest.skip(f"the shared data folder {b.DATA} lacks {', '.join(absent)}")
    weights = tmp_path / "w.pt"
    torch.save(rankopt.model("lenet5", num_classes=10, in_channels=1).state_dict(), weights)
    cfg = b.method_config(b.settings(True)["mnist"], "uniform", weights, tmp_path, "cpu")
    assert cfg["trials"] == len(cfg["enqueue"]) == len(b.UNIFORM_RATES) == 5
    assert "uniform" in b.HAND_METHODS
    fc = [p["fixed.fraction:fcs.0"] for p in cfg["enqueue"]]
    assert fc == sorted(fc, reverse=True) and len(set(fc)) == 5  # deeper cuts, smaller ranks
    assert all(p["decomposer.conv2"] == "tucker2" for p in cfg["enqueue"])
    assert not any("conv1" in k for p in cfg["enqueue"] for k in p)  # the first conv dense
    assert math.isclose(b.UNIFORM_RATES[-1], 64)
    load_config(cfg)  # a valid study
    head = b.method_config(b.settings(True)["mnist"], "uniform_head", weights, tmp_path, "cpu")
    assert head["trials"] == 5 and head["targets"] == {"exclude": ["fc_out"]}
    assert all("fixed.fraction:fc_out" not in p and "fixed.fraction:fcs.0" in p for p in head["enqueue"])
