"""A study over {finetune, nrmf, admm} completes and its trials record strategy and hyperparameters."""

from __future__ import annotations

import json
from pathlib import Path

import rankopt


def test_study_over_three_strategies_records_them(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = {
        "name": "strategies",
        "seed": 0,
        "device": "cpu",
        "model": {"name": "small_cnn", "kwargs": {"width": 8}},
        "data": {"name": "digits", "batch_size": 128},
        "reference": {"epochs": 2, "lr": 0.05},
        "decomposers": ["tucker2"],
        "selectors": {"energy": {"p": {"low": 0.6, "high": 0.9}}},
        "strategies": {
            "finetune": {"epochs": 0.5, "lr": 0.02},
            "nrmf": {"alpha": {"low": 1e-3, "high": 1e-1, "log": True}, "epochs": 0.5,
                     "finetune_epochs": 0.5, "lr": 0.02},
            "admm": {"rho": {"low": 0.1, "high": 3.0, "log": True}, "update_interval": 3,
                     "epochs": 0.5, "tol": 0.05, "finetune_epochs": 0.5, "lr": 0.02},
        },
        "sampler": {"name": "random", "seed": 0},
        "trials": 3,
        "run_dir": str(run_dir),
        "enqueue": [
            {"strategy": "finetune", "energy.p": 0.7},
            {"strategy": "nrmf", "energy.p": 0.7, "nrmf.alpha": 0.02},
            {"strategy": "admm", "energy.p": 0.7, "admm.rho": 1.0},
        ],
    }
    result = rankopt.run_study(config, progress=False)
    records = {r.strategy: r for r in result.trials()}
    assert set(records) == {"finetune", "nrmf", "admm"}
    off = {"distill_weight": 0.5, "distill_temperature": 4.0, "distill_features": 0.0}  # distillation, the default
    assert records["finetune"].hyperparameters == {"epochs": 0.5, "lr": 0.02, "optimizer": "sgd", **off}
    assert records["nrmf"].hyperparameters == {
        "alpha": 0.02, "epochs": 0.5, "finetune_epochs": 0.5, "lr": 0.02,
        "ranks_from": "regularized", "init_from": "regularized", **off,
    }
    admm = dict(records["admm"].hyperparameters)
    assert admm.pop("schedule") in ("steps", "epoch")  # searched: the default space holds both
    assert admm == {
        "rho": 1.0, "update_interval": 3, "epochs": 0.5, "tol": 0.05, "finetune_epochs": 0.5,
        "lr": 0.02, "rho_growth": 1.5, "rho_max": 100.0, **off,  # rising rho, the default
    }
    for record in records.values():
        assert record.selector == "energy" and record.selector_params["p"] == 0.7
        assert 0.0 < record.accuracy <= 1.0
        assert record.params < result.reference["params"]
    # what the strategies report reaches the trial's metrics file
    admm_metrics = json.loads(
        (run_dir / "trials" / str(records["admm"].trial) / "metrics.json").read_text()
    )
    history = json.dumps(admm_metrics)
    assert "admm_residual_history" in history
