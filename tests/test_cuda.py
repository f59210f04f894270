"""The same code on CUDA: decomposers, training with mixed precision, every strategy, a study.

Skipped where no CUDA device is present (CI and the developers' machines have none);
run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.training.loop import evaluate, make_loader, seed_everything, train
from rankopt.training.trial import LocalTrialContext

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine; these tests run on a GPU"
)

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    ("name", "module", "ranks"),
    [
        ("tucker2", nn.Conv2d(16, 24, 3, padding=1), (16, 24)),
        ("cp", nn.Conv2d(8, 8, 3, padding=1), None),
        ("tt", nn.Conv2d(16, 24, 3, stride=2, padding=1), None),
        ("svd", nn.Conv2d(16, 24, (3, 5), padding=(1, 2)), None),
        ("svd", nn.Linear(32, 20), None),
    ],
)
def test_decomposers_build_and_project_on_the_device(name, module, ranks) -> None:
    dec = rankopt.decomposer(name)
    module = module.to(CUDA)
    ranks = ranks or dec.max_ranks(module)
    built = dec.build(module, ranks)
    assert all(p.device.type == "cuda" for p in built.parameters())
    x = torch.randn(2, module.in_channels, 12, 12, device=CUDA) if isinstance(module, nn.Conv2d) \
        else torch.randn(2, module.in_features, device=CUDA)
    with torch.no_grad():
        ref, out = module(x), built(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (5e-2 if name == "cp" else 1e-3)  # float32 with TF32 matmuls
    small = tuple(max(1, r // 2) for r in dec.max_ranks(module))
    projected = dec.project(module.weight.detach(), small)
    assert projected.device.type == "cuda" and projected.dtype == module.weight.dtype
    assert projected.shape == module.weight.shape


@pytest.fixture(scope="module")
def reference():
    splits = rankopt.dataset("digits")
    seed_everything(0)
    model = rankopt.model("small_cnn", num_classes=10, in_channels=1)
    loader = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)
    result = train(model, loader, epochs=4, lr=0.05, device="cuda", amp=True, seed=0)
    assert next(model.parameters()).device.type == "cuda"
    assert result.steps > 0
    return model, splits


def test_mixed_precision_training_learns_on_cuda(reference) -> None:
    model, splits = reference
    acc = evaluate(model, make_loader(splits.val, batch_size=256), device="cuda")
    assert acc > 0.9


@pytest.mark.parametrize("strategy", ["finetune", "nrmf", "deeptwist", "admm", "tdlrt"])
def test_every_strategy_runs_on_cuda(reference, strategy: str) -> None:
    model, splits = reference
    ctx = LocalTrialContext(
        model, splits, input_shape=(1, 1, 8, 8), device="cuda", seed=0, batch_size=64,
        selector="fixed", selector_params={"fraction": 0.5},
    )
    strat = rankopt.strategy(strategy)
    params = strat.validate_params({})
    for key in ("epochs", "finetune_epochs"):
        if key in params:
            params[key] = min(params[key], 1)
    outcome = strat.run(ctx, params)
    assert outcome.spec, "nothing was compressed"
    assert all(p.device.type == "cuda" for p in outcome.model.parameters())
    assert ctx.evaluate(outcome.model) > 0.5


def test_quickstart_study_on_cuda(tmp_path: Path) -> None:
    result = rankopt.run_study(
        ROOT / "studies" / "quickstart.yaml", trials=4, run_dir=str(tmp_path / "run"), device="cuda"
    )
    front = result.front()
    assert front
    model = rankopt.load_compressed(front[0].model_path, map_location="cuda")
    assert next(model.parameters()).device.type == "cuda"
    out = model(torch.zeros(3, 1, 8, 8, device="cuda"))
    assert out.shape == (3, 10)


def test_ray_study_with_one_gpu_per_trial(tmp_path: Path) -> None:
    """The ray backend with ``gpus: 1``: the device is resolved in each worker, the
    reference trains as a Ray task on a GPU, and every trial ran on CUDA."""
    import json

    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        result = rankopt.run_study(
            ROOT / "studies" / "quickstart.yaml", trials=3, run_dir=str(tmp_path / "run"),
            device="cuda", backend="ray", resources={"cpus": 1, "gpus": 1}, max_concurrent=1,
            reference={"epochs": 1, "on": "cluster"},
        )
    finally:
        ray.shutdown()
    trials = result.study.trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    for t in trials:
        metrics = json.loads((result.run_dir / "trials" / str(t.number) / "metrics.json").read_text())
        assert metrics["device"].startswith("cuda")
    assert result.reference["device"].startswith("cuda")
