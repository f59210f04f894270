"""The trial's search space: every method's parameters are asked, so NSGA-II can evolve them."""

from __future__ import annotations

from pathlib import Path

import optuna

import rankopt
from rankopt.config import load_config
from rankopt.search.space import SearchSpace
from rankopt.surgery import find_layers

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
