"""The trial's search space: every method's parameters are asked, so NSGA-II can evolve them."""

from __future__ import annotations

from pathlib import Path

import optuna
import torch

import rankopt
from rankopt.config.schema import load_config
from rankopt.search.space import SearchSpace
from rankopt.compression.surgery import find_layers
from study_support import RANDOM, small_study

ROOT = Path(__file__).resolve().parents[1]


def test_every_selectors_and_strategys_parameters_are_asked_in_every_trial() -> None:
    config = load_config(ROOT / "studies" / "quickstart.yaml")
    model = rankopt.model("small_cnn", num_classes=10, in_channels=1, **config.model.kwargs)
    space = SearchSpace(config, model, find_layers(model, (1, 1, 8, 8)))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    chosen = set()
    for _ in range(6):
        trial = study.ask()
        values = space.suggest(trial)
        chosen.add(values["selector"])
        # both selectors' parameters are there whichever selector the trial uses
        assert {"energy.p", "fixed.fraction", "finetune.lr"} <= set(trial.params)
        plan = space.plan(values)
        other = "fixed" if plan.selector == "energy" else "energy"
        assert not any(k in plan.selector_params for k in space.selectors[other].searched)
        study.tell(trial, [0.5, 1.0])
    assert chosen == {"energy", "fixed"}
    # NSGA-II's crossover works on the parameters all trials share: the selectors' now
    shared = optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False))
    assert {"energy.p", "fixed.fraction"} <= set(shared)


def _allow_full_study(tmp_path: Path, **changes: object) -> dict[str, object]:
    targets = {"allow_full": True, "dense_input_channels": 0}  # conv 0 (1 channel) too
    return small_study("allow_full", tmp_path, **{"decomposers": ["tucker2", "svd"], "targets": targets,
                                                   "selectors": {"fixed": {"fraction": 0.25}},
                                                   "strategies": {"finetune": {"epochs": 0}}, "sampler": RANDOM, **changes})


def test_allow_full_adds_a_per_layer_full_choice_that_leaves_the_layer_alone(tmp_path: Path) -> None:
    config = load_config(_allow_full_study(tmp_path))
    model = rankopt.model("small_cnn", num_classes=10, in_channels=1, width=8)
    space = SearchSpace(config, model, find_layers(model, (1, 1, 8, 8)))
    dists = space.distributions()
    # every target layer gets the choice, also those only one decomposer supports
    assert {layer: list(dists[f"decomposer.{layer}"].choices) for layer in space.layer_options} == {
        "0": ["tucker2", "svd", "full"], "3": ["tucker2", "svd", "full"],
        "7": ["tucker2", "svd", "full"], "12": ["svd", "full"],
    }
    plan = space.plan({"decomposer.0": "full", "decomposer.3": "svd", "decomposer.7": "tucker2",
                       "decomposer.12": "full"})
    assert plan.decomposers == {"3": "svd", "7": "tucker2"}
    # without the option the space is unchanged: no 'full' anywhere
    plain = SearchSpace(load_config(_allow_full_study(tmp_path, targets={})), model,
                        find_layers(model, (1, 1, 8, 8)))
    assert all("full" not in options for options in plain.layer_options.values())
    assert "decomposer.12" not in plain.distributions()


def test_layers_chosen_full_keep_the_reference_weights_and_counts(tmp_path: Path) -> None:
    every_layer = {f"decomposer.{n}": "full" for n in ("0", "3", "7", "12")}
    one_layer = {**every_layer, "decomposer.7": "tucker2"}
    result = rankopt.run_study(
        _allow_full_study(tmp_path, trials=2, enqueue=[every_layer, one_layer]), progress=False
    )
    records = {r.trial: r for r in result.trials()}
    reference = result.reference
    # all full: the reference itself (no fine-tuning here), to the last count and sample
    assert records[0].spec == {}
    assert (records[0].params, records[0].flops) == (reference["params"], reference["flops"])
    assert records[0].accuracy == reference["accuracy"]
    # one decomposed layer: only it changes
    assert set(records[1].spec) == {"7"}
    assert records[1].params < reference["params"]


def test_the_energy_selector_can_search_squared_and_linear_p(tmp_path: Path) -> None:
    config = load_config(
        _allow_full_study(
            tmp_path,
            targets={},
            selectors={"energy": {"p": 0.7, "energy": {"choices": ["squared", "linear"]}}},
        )
    )
    model = rankopt.model("small_cnn", num_classes=10, in_channels=1, width=8)
    torch.manual_seed(0)
    layers = find_layers(model, (1, 1, 8, 8))
    space = SearchSpace(config, model, layers)
    assert space.distributions()["energy.energy"] == optuna.distributions.CategoricalDistribution(
        ["squared", "linear"]
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    ranks = {}
    for _ in range(8):
        trial = study.ask()
        plan = space.plan(space.suggest(trial))
        params = plan.selector_params
        assert params["p"] == 0.7 and params["energy"] in ("squared", "linear")
        conv = model.get_submodule("3")
        ranks[params["energy"]] = rankopt.rank_selector("energy").select(conv, rankopt.decomposer("tucker2"), **params)
        study.tell(trial, 0.0)
    # both were tried, and the same p means more rank when singular values count linearly
    assert set(ranks) == {"squared", "linear"}
    assert all(lin >= sq for lin, sq in zip(ranks["linear"], ranks["squared"]))
    assert ranks["linear"] != ranks["squared"]
