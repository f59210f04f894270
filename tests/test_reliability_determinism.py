"""Determinism (issue 7, point 6): the same study file and seed give the same trial
parameters and, on CPU, the same metrics and weights, in two different run directories.
"""

from __future__ import annotations

from pathlib import Path

import torch

import rankopt
from reliability_support import tiny_study

STUDY = tiny_study(
    trials=3,
    device="cpu",
    sampler={"name": "nsgaii", "seed": 7, "options": {"population_size": 4}},
    selectors={"energy": {"p": {"low": 0.6, "high": 0.95}}, "fixed": {"fraction": {"low": 0.1, "high": 0.6}}},
    strategies={"finetune": {"epochs": 0.2, "lr": {"low": 0.01, "high": 0.1, "log": True}}},
    seed=3,
)
MEASURED = ("accuracy", "params", "flops", "params_compression", "flops_compression", "ranks_summary")


def test_same_file_and_seed_give_the_same_trials(tmp_path: Path) -> None:
    first = rankopt.run_study(STUDY, run_dir=str(tmp_path / "a"))
    second = rankopt.run_study(STUDY, run_dir=str(tmp_path / "b"))
    assert first.reference == {**second.reference, "seconds": first.reference["seconds"]}

    a, b = first.study.trials, second.study.trials
    assert [t.state.name for t in a] == [t.state.name for t in b] == ["COMPLETE"] * 3
    assert [t.params for t in a] == [t.params for t in b]
    assert len({tuple(sorted(t.params.items())) for t in a}) == 3  # the trials differ
    for x, y in zip(a, b):
        assert {k: x.user_attrs[k] for k in MEASURED} == {k: y.user_attrs[k] for k in MEASURED}
        wa = torch.load(tmp_path / "a" / "trials" / str(x.number) / "model.pt", weights_only=True)
        wb = torch.load(tmp_path / "b" / "trials" / str(y.number) / "model.pt", weights_only=True)
        assert wa["state_dict"].keys() == wb["state_dict"].keys()
        assert all(torch.equal(wa["state_dict"][k], wb["state_dict"][k]) for k in wa["state_dict"])

    # another seed gives other trials
    third = rankopt.run_study({**STUDY, "sampler": {**STUDY["sampler"], "seed": 8}},
                              run_dir=str(tmp_path / "c"))
    assert [t.params for t in third.study.trials] != [t.params for t in a]
