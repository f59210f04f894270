"""The Python API: a user's own module and data, callables, constraints, latency, event hooks."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import rankopt
from rankopt import DatasetSplits, hookimpl
from rankopt.core.errors import ConfigError
from rankopt.study import ConstraintsFunc, Study
from study_support import blobs


class Recorder:
    """An in-process plugin that records the event hooks."""

    def __init__(self) -> None:
        self.trials: list[tuple[int, dict[str, Any]]] = []
        self.summaries: list[dict[str, Any]] = []

    @hookimpl
    def rankopt_trial_finished(self, run_dir: Path, trial_number: int, params: Mapping[str, Any],
                               metrics: Mapping[str, Any]) -> None:
        self.trials.append((trial_number, dict(metrics)))

    @hookimpl
    def rankopt_study_finished(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        self.summaries.append(dict(summary))


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    rankopt.register_plugin(rec)
    yield rec
    rankopt.reset_registry()


def user_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 36, 2),
    )


def study_dict(run_dir: Path, **changes: object) -> dict:
    base = {
        "name": "api",
        "reference": {"epochs": 2, "lr": 0.05},
        "decomposers": ["tucker2", "svd"],
        "selectors": {"fixed": {"fraction": {"low": 0.2, "high": 0.9}}},
        "strategies": {"finetune": {"epochs": 1, "lr": 0.02}},
        "sampler": {"name": "random", "seed": 0},
        "trials": 3,
        "run_dir": str(run_dir),
    }
    base.update(changes)
    return base


def test_user_module_and_loaders_with_latency_and_hooks(tmp_path: Path, recorder: Recorder) -> None:
    train, val = blobs(256, 0), blobs(128, 1)
    splits = DatasetSplits(
        train=DataLoader(train, batch_size=32, shuffle=True), val=val, num_classes=2, input_shape=(1, 6, 6)
    )
    net = user_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = Study(
        study_dict(tmp_path / "run", objectives=["accuracy", "params", "latency"]),
        model=net,
        data=splits,
    ).run()
    # the user's module is copied, never trained in place
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert result.reference["accuracy"] > 0.9
    trials = result.trials()
    assert len(trials) == 3 and all(r.latency_ms is not None and r.latency_ms > 0 for r in trials)
    assert result.study.directions[2].name == "MINIMIZE"
    # the hooks saw every trial, then the summary
    assert sorted(n for n, _ in recorder.trials) == [0, 1, 2]
    assert all(m["state"] == "COMPLETE" and "accuracy" in m for _, m in recorder.trials)
    assert recorder.summaries and recorder.summaries[-1]["trials"] == {"COMPLETE": 3}
    # a model built from a user module reloads when the caller passes the architecture
    rec = result.front()[0]
    with pytest.raises(rankopt.ArtifactError, match="names no registered base model"):
        rankopt.load_compressed(rec.model_path)
    model = rankopt.load_compressed(rec.model_path, model=user_net())
    assert rankopt.count(model, (1, 1, 6, 6)).params == rec.params


def test_callable_model_reloads_through_its_import_path(tmp_path: Path) -> None:
    result = rankopt.run_study(
        study_dict(
            tmp_path / "run",
            model={"name": "rankopt.plugins.models.small_cnn:small_cnn", "kwargs": {"width": 4}},
            data={"name": "digits"},
            reference={"epochs": 0.5},
            strategies={"finetune": {"epochs": 0}},
            trials=1,
        )
    )
    rec = result.trials()[0]
    payload = rankopt.deploy.artifacts.read_compressed(rec.model_path)
    assert payload["base"]["callable"] == "rankopt.plugins.models.small_cnn:small_cnn"
    with pytest.raises(rankopt.ArtifactError, match="never imports a module"):
        rankopt.load_compressed(rec.model_path)  # a file never makes rankopt import code
    model = rankopt.load_compressed(rec.model_path, allow_modules=["rankopt.plugins"])
    assert rankopt.count(model, (1, 1, 8, 8)).params == rec.params
    # the study's own results trust the module its study file named (and only that one)
    assert result.model_modules == ["rankopt.plugins.models.small_cnn"]
    assert rankopt.count(result.load_model(rec.trial), (1, 1, 8, 8)).params == rec.params
    metrics = json.loads(Path(rec.model_path).with_name("metrics.json").read_text())
    assert metrics["hyperparameters"]["epochs"] == 0 and metrics["train_seconds"] == 0


def test_constraints_reach_the_sampler_and_the_front(tmp_path: Path) -> None:
    limit = 3000
    result = rankopt.run_study(
        study_dict(
            tmp_path / "run",
            model={"name": "small_cnn", "kwargs": {"width": 8}},
            data={"name": "digits"},
            reference={"epochs": 0.5},
            strategies={"finetune": {"epochs": 0}},
            selectors={"fixed": {"fraction": {"low": 0.1, "high": 0.9}}},
            enqueue=[{"fixed.fraction": 0.1}, {"fixed.fraction": 0.9}],
            sampler={"name": "nsgaii", "seed": 0},
            constraints={"max_params": limit},
            trials=3,
        )
    )
    trials = result.trials()
    small = [r for r in trials if r.params <= limit]
    big = [r for r in trials if r.params > limit]
    assert small and big, [r.params for r in trials]
    # each trial carries its constraint value, as the sampler reads it
    from optuna.study._constrained_optimization import _get_feasible_trials

    feasible = {t.number for t in _get_feasible_trials(result.study.trials)}
    assert feasible == {r.trial for r in small}
    # the front holds feasible trials only, even the most accurate infeasible one is left out
    assert {r.trial for r in result.front()} <= feasible
    # Optuna < 5 has no Trial.set_constraint: the sampler then gets a constraints_func
    func = ConstraintsFunc(max_params=1000, max_flops=None)
    assert func(type("T", (), {"user_attrs": {"params": 1500}})()) == [500.0]  # type: ignore[arg-type]


def test_bad_python_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model must be an nn.Module"):
        Study(study_dict(tmp_path), model="resnet")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="model: required"):
        Study(study_dict(tmp_path, data={"name": "digits"}))
    with pytest.raises(ConfigError, match="data.name: required"):
        Study(study_dict(tmp_path), model=user_net())
