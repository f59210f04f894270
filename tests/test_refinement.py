"""The refining sampler (issue 29, item 3): moves from the front along per-layer rank
ladders, a share of the sampler's own trials, no repeats, enqueued points untouched."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch.nn as nn
from optuna.trial import TrialState

import rankopt
from rankopt.config.schema import load_config
from rankopt.contract.selector import RankAlignment
from rankopt.core.errors import ConfigError
from rankopt.search.refine_plan import build_refine_plan, layer_ladder
from rankopt.search.refining import PROPOSED_BY, RefiningSampler, with_refinement, refinement_state
from rankopt.search.space import SearchSpace

sys.path.insert(0, str(Path(__file__).parent))
from study_support import digits_study, small_study  # noqa: E402

PER_LAYER = {"fixed": {"space": {"per_layer": True}}}


def test_a_ladder_is_cheapest_first_aligned_and_ends_dense() -> None:
    conv = nn.Conv2d(32, 64, 3)
    layer = rankopt.find_layers(nn.Sequential(conv), (1, 32, 8, 8))[0]
    dec = rankopt.decomposer("tucker2")
    largest = dec.max_ranks(conv)
    ladder = layer_ladder(conv, dec, layer, alignment=RankAlignment(8, 0), min_saving=0.1)
    assert ladder[-1].ranks is None and ladder[-1].params == conv.weight.numel() + 64
    factorized = ladder[:-1]
    assert len(factorized) >= 4
    assert [s.params for s in factorized] == sorted(s.params for s in factorized)
    assert len({s.ranks for s in factorized}) == len(factorized)
    for step in factorized:  # multiples of 8 (or the largest rank), each saving >= 10 %
        assert all(r % 8 == 0 or r == hi for r, hi in zip(step.ranks, largest))
        assert step.params <= 0.9 * ladder[-1].params
    assert all(a.loss > b.loss for a, b in zip(ladder, ladder[1:]))  # each dearer step keeps more
    # the fixed selector gives each step's ranks at the step's fraction
    sel = rankopt.rank_selector("fixed")
    for step in factorized:
        got = sel.select(conv, dec, fraction=step.fraction)
        assert RankAlignment(8, 0).apply(got, largest) == step.ranks


def _plan(**config: Any) -> tuple[Any, Any]:
    cfg = load_config(small_study("r", selectors={**PER_LAYER, "energy": {}}, decomposers=["tucker2", "svd"],
                                  **config))
    model = rankopt.model("small_cnn", num_classes=10, in_channels=1, width=8)
    from rankopt.search.building import find_targets

    targets = find_targets(cfg, model, (1, 1, 8, 8))  # as a study finds them: no thin stem
    space = SearchSpace(cfg, model, targets)
    plan = build_refine_plan(space, model, targets, min_in_channels=4, objectives=cfg.objectives)
    assert plan is not None
    return space, plan


def _add_trial(study: optuna.Study, plan: Any, steps: dict[str, int], accuracy: float, *,
               enqueued: bool = True) -> None:
    """A finished trial at ``steps`` (ladder index per layer, tucker2 on convs)."""
    ranks, params, flops, point = {}, 0, 0, dict(plan.head)
    for layer, by_dec in plan.ladders.items():
        dec = next(iter(by_dec))
        step = by_dec[dec][steps.get(layer, len(by_dec[dec]) - 1)]
        params, flops = params + step.params, flops + step.flops
        if step.ranks is not None:
            ranks[layer] = list(step.ranks)
        point[plan.fraction_keys[layer]] = step.fraction
        if layer in plan.decomposer_keys:
            point[plan.decomposer_keys[layer]] = dec
    dists = {k: plan.distributions[k] for k in point}
    study.add_trial(optuna.trial.create_trial(
        params=point, distributions=dists, values=[accuracy, params, flops],
        user_attrs={"ranks": ranks, "decomposers": {k: next(iter(plan.ladders[k])) for k in ranks},
                    "params": params, "flops": flops},
        system_attrs={"fixed_params": point} if enqueued else {}))


def _ask(study: optuna.Study, space: Any) -> tuple[optuna.Trial, dict[str, Any]]:
    trial = study.ask()
    return trial, space.suggest(trial)


def _state(plan: Any, values: dict[str, Any]) -> tuple[int, ...]:
    out = []
    for layer, by_dec in plan.ladders.items():
        ladder = by_dec[values.get(plan.decomposer_keys.get(layer, ""), next(iter(by_dec)))]
        f = values[plan.fraction_keys[layer]]
        out.append(max(i for i, s in enumerate(ladder) if s.fraction <= f + 1e-12))
    return tuple(out)


def test_moves_start_from_the_front_cut_by_sensitivity_and_never_repeat() -> None:
    space, plan = _plan()
    layers = plan.layers
    assert layers == ["3", "7", "12"]  # the 1-channel stem is not searched per layer
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    mid = {layer: len(next(iter(plan.ladders[layer].values()))) // 2 for layer in layers}
    _add_trial(study, plan, mid, 0.95)  # the front's cheapest model near the best accuracy
    _add_trial(study, plan, {}, 0.96)  # dense
    _add_trial(study, plan, {layer: 0 for layer in layers}, 0.30)  # far below the line
    sampler = RefiningSampler(optuna.samplers.RandomSampler(seed=0), plan, share=1.0, seed=0, cut=0.1)
    study.sampler = sampler
    seen = {_state(plan, t.params) for t in study.trials}
    trial, values = _ask(study, space)
    assert trial.user_attrs[PROPOSED_BY] == "refinement:cut_params:0"
    state = _state(plan, values)
    assert values.get("selector", "fixed") == "fixed" and state not in seen
    # a cut: every layer at or below the parent, params down by at least 10 %
    assert all(s <= mid[layer] for s, layer in zip(state, layers))
    params = sum(next(iter(plan.ladders[l].values()))[i].params for l, i in zip(layers, state))
    parent = study.trials[0].user_attrs["params"]
    assert params <= 0.9 * parent
    study.tell(trial, [0.94, params, 1.0])
    moves = []
    for _ in range(7):
        trial, values = _ask(study, space)
        moves.append(trial.user_attrs[PROPOSED_BY].split(":")[1])
        state = _state(plan, values)
        assert state not in seen, "a move repeated an earlier model"
        seen.add(state)
        study.tell(trial, [0.9, 1000.0 + len(seen), 1.0])
    assert set(moves) == {"cut_params", "cut_flops", "swap", "local"}


def test_a_share_of_the_samplers_own_trials_is_refined_and_enqueued_points_run_as_given() -> None:
    space, plan = _plan()
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    _add_trial(study, plan, {}, 0.96)
    study.sampler = RefiningSampler(optuna.samplers.RandomSampler(seed=1), plan, share=0.5, seed=1)
    point = {plan.fraction_keys[layer]: 0.5 for layer in plan.layers} | dict(plan.head)
    study.enqueue_trial(point)
    trial, values = _ask(study, space)
    assert PROPOSED_BY not in trial.user_attrs
    assert all(values[k] == v for k, v in point.items())
    study.tell(trial, [0.9, 10.0, 10.0])
    labels = []
    for _ in range(4):
        trial, _ = _ask(study, space)
        labels.append(trial.user_attrs[PROPOSED_BY].split(":")[0])
        study.tell(trial, state=TrialState.FAIL)
    assert labels == ["refinement", "RandomSampler", "refinement", "RandomSampler"]


class _Repeater(optuna.samplers.RandomSampler):
    """A sampler whose joint point is always the same, an earlier trial's."""

    def __init__(self, point: dict[str, Any], dists: dict[str, Any]) -> None:
        super().__init__(seed=0)
        self.point, self.dists = point, dists

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return dict(self.dists)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> dict[str, Any]:
        return {k: v for k, v in self.point.items() if k in search_space}


def test_the_wrapped_samplers_repeat_is_replaced_by_a_move() -> None:
    space, plan = _plan()
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    _add_trial(study, plan, {layer: 1 for layer in plan.layers}, 0.95)
    earlier = study.trials[0].params
    dists = {k: plan.distributions[k] for k in earlier}
    base = _Repeater(earlier, dists)
    study.sampler = RefiningSampler(base, plan, share=0.01, seed=0)  # 1st own refined, 2nd base
    first, _ = _ask(study, space)
    study.tell(first, [0.9, 5.0, 5.0])
    second, values = _ask(study, space)
    assert second.user_attrs[PROPOSED_BY].startswith("refinement:local:")
    assert _state(plan, values) not in {_state(plan, t.params) for t in study.trials[:2]}
    # fractions that realize an earlier model's ranks are a repeat too: 0.96 of the
    # classifier's 10 ranks is rank 10, which saves nothing, so the layer stays dense
    _add_trial(study, plan, {"3": 2, "7": 2}, 0.93)
    base.point = {**study.trials[-1].params, plan.fraction_keys["12"]: 0.96}
    again, values = _ask(study, space)
    assert again.user_attrs[PROPOSED_BY].startswith("refinement:local:")
    study.tell(again, [0.9, 7.0, 7.0])
    # a point of its own (no repeat) is the wrapped sampler's, as drawn
    study.tell(second, [0.9, 6.0, 6.0])
    base.point = {**earlier, plan.fraction_keys["12"]: 1.0}
    third, values = _ask(study, space)
    assert third.user_attrs[PROPOSED_BY] == "_Repeater" and values[plan.fraction_keys["12"]] == 1.0


def test_the_wrapper_pickles_with_its_plan() -> None:
    from rankopt.search.sampler import make_sampler

    _, plan = _plan()
    config = load_config(small_study("r", selectors=PER_LAYER, sampler={"name": "tpe", "seed": 3}))
    wrapped = RefiningSampler(make_sampler(config), plan, share=0.25, seed=3)
    copy = pickle.loads(pickle.dumps(wrapped))
    assert isinstance(copy, RefiningSampler) and isinstance(copy.base, optuna.samplers.TPESampler)
    assert copy.plan == plan and copy.share == 0.25
    again = with_refinement(make_sampler(config), refinement_state(wrapped))
    assert isinstance(again, RefiningSampler) and again.plan == plan


def test_refinement_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="refinement.share"):
        load_config(small_study("r", refinement={"share": 0}))
    with pytest.raises(ConfigError, match="refinement.cut"):
        load_config(small_study("r", refinement={"cut": 1.0}))
    assert load_config(small_study("r", refinement=None)).refinement is None
    assert load_config(small_study("r")).refinement.share == 0.5


def test_a_study_refines_its_front_without_repeats(tmp_path: Path) -> None:
    config = digits_study("refine", tmp_path / "run", trials=12, sampler={"name": "tpe", "seed": 0},
                          selectors={**PER_LAYER, "energy": {}}, seed_proposals=1,
                          multi_fidelity=None)
    result = rankopt.run_study(config, progress=False)
    trials = [t for t in result.study.trials if t.state == TrialState.COMPLETE]
    refined = [t for t in trials if str(t.user_attrs.get(PROPOSED_BY, "")).startswith("refinement")]
    assert refined, "no trial was refined"
    assert all(t.user_attrs.get("repeat_of") is None for t in trials)
    ranks = [repr(sorted(t.user_attrs["ranks"].items())) for t in trials]
    assert len(set(ranks)) == len(ranks)
    off = rankopt.run_study({**config, "name": "plain", "run_dir": str(tmp_path / "plain"), "refinement": None},
                            progress=False)
    assert not any(str(t.user_attrs.get(PROPOSED_BY, "")).startswith("refinement") for t in off.study.trials)
