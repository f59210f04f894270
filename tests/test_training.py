"""The shared training loop, evaluation, seeding and device selection."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import rankopt
from rankopt.training.devices import resolve_device
from rankopt.core.errors import ConfigError, TrainingDivergedError
from rankopt.training.loop import TrainResult, evaluate, make_loader, seed_everything, train


@pytest.fixture(scope="module")
def digits() -> rankopt.DatasetSplits:
    return rankopt.dataset("digits")


@pytest.fixture()
def blobs() -> TensorDataset:
    """100 linearly separable 4-d points in 2 classes: 10 batches of 10."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(100) % 2
    x = torch.randn(100, 4, generator=gen) + 3.0 * (2 * y - 1).unsqueeze(1).float()
    return TensorDataset(x, y)


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_small_cnn(splits: rankopt.DatasetSplits) -> tuple[nn.Module, TrainResult]:
    torch.manual_seed(0)
    model = rankopt.model("small_cnn", num_classes=10, in_channels=1, width=16)
    loader = make_loader(splits.train, batch_size=64, shuffle=True)
    result = train(model, loader, epochs=2, lr=0.05, seed=0, device="cpu")
    return model, result


def test_small_cnn_learns_digits_and_is_bit_reproducible(digits: rankopt.DatasetSplits) -> None:
    first, r1 = _train_small_cnn(digits)
    accuracy = evaluate(first, make_loader(digits.val, batch_size=256))
    assert accuracy > 0.8  # chance is 0.1
    assert r1.steps == 2 * math.ceil(len(digits.train) / 64) and r1.epochs == 2.0
    assert len(r1.losses) == 2 and r1.losses[1] < r1.losses[0]
    second, r2 = _train_small_cnn(digits)
    assert r1.losses == r2.losses and r1.final_loss == r2.final_loss
    s1, s2 = first.state_dict(), second.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_fractional_epochs_and_max_steps(blobs: TensorDataset) -> None:
    loader = make_loader(blobs, batch_size=10, shuffle=True, seed=1)
    seen: list[tuple[int, int]] = []
    result = train(_linear(), loader, epochs=2.5, lr=0.1, progress=lambda s, t, loss: seen.append((s, t)))
    assert result.steps == 25 and result.epochs == 2.5
    assert len(result.losses) == 3 and len(result.lrs) == 3
    assert seen == [(s, 25) for s in range(1, 26)]
    assert train(_linear(), loader, epochs=0.5, lr=0.1).steps == 5
    assert train(_linear(), loader, epochs=0.01, lr=0.1).steps == 1  # at least one step
    assert train(_linear(), loader, epochs=3, lr=0.1, max_steps=7).steps == 7
    model = _linear()
    before = _state(model)
    calls: list[int] = []
    zero = train(model, loader, epochs=0, lr=0.1, step_callback=lambda m, s: calls.append(s))
    assert zero.steps == 0 and zero.losses == [] and calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_extra_loss_is_added_every_step_and_step_callback_sees_each_step(blobs: TensorDataset) -> None:
    loader = make_loader(blobs, batch_size=10)
    plain: list[float] = []
    with_extra: list[float] = []
    extra_calls = 0

    def extra(model: nn.Module) -> torch.Tensor:
        nonlocal extra_calls
        extra_calls += 1
        return torch.tensor(5.0)

    steps: list[int] = []
    models: list[nn.Module] = []

    def callback(model: nn.Module, step: int) -> None:
        steps.append(step)
        models.append(model)

    # lr=0 keeps the weights, so both runs see identical task losses at every step
    train(_linear(), loader, epochs=1, lr=0.0, progress=lambda s, t, loss: plain.append(loss))
    net = _linear()
    train(net, loader, epochs=1, lr=0.0, extra_loss=extra, step_callback=callback,
          progress=lambda s, t, loss: with_extra.append(loss))
    assert extra_calls == 10 and steps == list(range(1, 11)) and all(m is net for m in models)
    assert with_extra == pytest.approx([p + 5.0 for p in plain], abs=1e-5)


def test_extra_loss_gradient_reaches_the_weights(blobs: TensorDataset) -> None:
    loader = make_loader(blobs, batch_size=10)
    free, shrunk = _linear(), _linear()
    train(free, loader, epochs=1, lr=0.05, weight_decay=0.0)
    train(shrunk, loader, epochs=1, lr=0.05, weight_decay=0.0,
          extra_loss=lambda m: 10.0 * m.weight.pow(2).sum())
    assert shrunk.weight.norm() < 0.5 * free.weight.norm()


def test_nonfinite_loss_raises_training_diverged(blobs: TensorDataset) -> None:
    loader = make_loader(blobs, batch_size=10)
    with pytest.raises(TrainingDivergedError, match=r"at step 1 of 10.*extra_loss inf.*lower it"):
        train(_linear(), loader, epochs=1, lr=0.1, extra_loss=lambda m: torch.tensor(float("inf")))
    # a deep linear net on random labels: the weights' growth feeds itself until overflow
    torch.manual_seed(0)
    noise = TensorDataset(torch.randn(100, 4), torch.randint(0, 2, (100,)))
    net = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    steps: list[int] = []
    with pytest.raises(TrainingDivergedError, match=r"lr=1000000\.0 is probably too high") as info:
        train(net, make_loader(noise, batch_size=10), epochs=5, lr=1e6, momentum=0.0,
              weight_decay=0.0, step_callback=lambda m, s: steps.append(s))
    # it stops at the first non-finite loss, long before the 50 steps asked for
    assert f"at step {len(steps) + 1} of 50" in str(info.value) and len(steps) < 50


def test_schedules_follow_their_rule(blobs: TensorDataset) -> None:
    loader = make_loader(blobs, batch_size=10)
    step = train(_linear(), loader, epochs=3, lr=0.1, schedule="step", step_size=1, gamma=0.1)
    assert step.lrs == pytest.approx([0.1, 0.01, 0.001])
    cosine = train(_linear(), loader, epochs=2, lr=0.1, schedule="cosine")
    assert cosine.lrs[0] == pytest.approx(0.1) and cosine.lrs[1] == pytest.approx(0.05, rel=0.2)
    constant = train(_linear(), loader, epochs=3, lr=0.1, schedule="constant")
    assert constant.lrs == pytest.approx([0.1, 0.1, 0.1])


def test_adam_reduces_the_loss(blobs: TensorDataset) -> None:
    result = train(_linear(), make_loader(blobs, batch_size=10, shuffle=True, seed=0),
                   epochs=3, lr=0.05, optimizer="adam", weight_decay=0.0)
    assert result.losses[-1] < 0.5 * result.losses[0]


def test_grad_clip_bounds_the_update(blobs: TensorDataset) -> None:
    model = _linear()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    train(model, make_loader(blobs, batch_size=10), epochs=0.1, lr=1.0, weight_decay=0.0,
          grad_clip=1e-3)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # one Nesterov step moves by lr * (1 + momentum) * clipped gradient
    assert 0 < (after - before).norm() <= 1.9e-3 * (1 + 1e-5)


def test_params_restricts_what_is_optimized() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    first, last = _state(model[0]), _state(model[2])
    data = TensorDataset(torch.randn(20, 4), torch.arange(20) % 2)
    train(model, make_loader(data, batch_size=5), epochs=1, lr=0.1, params=model[2].parameters())
    assert all(torch.equal(first[k], v) for k, v in model[0].state_dict().items())
    assert not torch.equal(last["weight"], model[2].weight)


def test_train_restores_mode_and_evaluate_counts_top1() -> None:
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    model = nn.Sequential(nn.Identity())
    loader = make_loader(TensorDataset(logits, labels), batch_size=3)
    model.train()
    assert evaluate(model, loader) == 0.75 and model.training
    model.eval()
    assert evaluate(model, loader, device="cpu") == 0.75 and not model.training
    net = _linear().eval()
    train(net, make_loader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))),
          epochs=1, lr=0.1)
    assert not net.training


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": -1}, r"epochs must be a finite number >= 0, got -1"),
        ({"epochs": float("nan")}, r"epochs must be a finite number"),
        ({"lr": -0.1}, r"lr must be a finite number >= 0, got -0.1"),
        ({"optimizer": "rmsprop"}, r"optimizer must be one of 'sgd', 'adam', got 'rmsprop'"),
        ({"schedule": "poly"}, r"schedule must be one of 'cosine', 'step', 'constant', got 'poly'"),
        ({"momentum": 1.0}, r"momentum must be a finite number >= 0 and < 1"),
        ({"grad_clip": 0}, r"grad_clip must be a finite number > 0"),
        ({"max_steps": -2}, r"max_steps must be an integer >= 0"),
        ({"device": "tpu"}, r"device must be 'auto', 'cpu'"),
    ],
)
def test_bad_arguments_raise_config_error_before_training(
    blobs: TensorDataset, kwargs: dict, match: str
) -> None:
    args = {"epochs": 1, "lr": 0.1, **kwargs}
    model = _linear()
    before = _state(model)
    with pytest.raises(ConfigError, match=match):
        train(model, make_loader(blobs, batch_size=10), **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_rejects_a_dataset_in_place_of_a_loader(blobs: TensorDataset) -> None:
    with pytest.raises(ConfigError, match="loader must be a torch DataLoader.*make_loader"):
        train(_linear(), blobs, epochs=1, lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="batch_size must be an integer >= 1, got 0"):
        make_loader(blobs, batch_size=0)


def test_make_loader_seed_fixes_the_order(blobs: TensorDataset) -> None:
    def order(seed: int) -> list[int]:
        return [int(i) for _, y in make_loader(blobs, batch_size=100, shuffle=True, seed=seed)
                for i in torch.argsort(y)[:5]]

    first = [x[0].tolist() for x in make_loader(blobs, batch_size=100, shuffle=True, seed=3)]
    again = [x[0].tolist() for x in make_loader(blobs, batch_size=100, shuffle=True, seed=3)]
    other = [x[0].tolist() for x in make_loader(blobs, batch_size=100, shuffle=True, seed=4)]
    assert first == again and first != other
    assert order(3) == order(3)


def test_seed_everything_reseeds_python_numpy_and_torch() -> None:
    seed_everything(123)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(123)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    with pytest.raises(ConfigError, match="seed must be an integer"):
        seed_everything(1.5)  # type: ignore[arg-type]


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device(None).type == expected
    with pytest.raises(ConfigError, match=r"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"'cuda:1' was requested but CUDA is not available"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(ConfigError, match=r"valid indices 0\.\."):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
