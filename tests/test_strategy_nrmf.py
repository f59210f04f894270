"""NRMF: the nuclear-norm penalty, and its effect on the selected ranks on real data (digits)."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
from strategies_support import make_context, trained_reference

import rankopt
from rankopt.plugins.strategies.nrmf import nuclear_norm_penalty
from rankopt.trial import LocalTrialContext


def test_penalty_is_alpha_times_the_nuclear_norms_of_the_channel_unfoldings() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Flatten(), nn.Linear(5 * 4 * 4, 4))
    penalty = nuclear_norm_penalty(["0", "2"], alpha=0.3)(net)
    w = net[0].weight.detach().double().numpy()
    expected = (
        np.linalg.norm(w.reshape(5, -1), "nuc")
        + np.linalg.norm(w.transpose(1, 0, 2, 3).reshape(3, -1), "nuc")
        + np.linalg.norm(net[2].weight.detach().double().numpy(), "nuc")
    )
    assert np.isclose(float(penalty.detach()), 0.3 * expected, rtol=1e-5)


def test_penalty_gradient_is_u_vt() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4))
    nuclear_norm_penalty(["0"], alpha=2.0)(net).backward()
    u, _, vh = torch.linalg.svd(net[0].weight.detach(), full_matrices=False)
    assert torch.allclose(net[0].weight.grad, 2.0 * u @ vh, atol=1e-5)


class RecordingContext(LocalTrialContext):
    """Keeps a copy of the full model each time ranks are selected on it."""

    seen: list[nn.Module]

    def select_ranks(self, model: nn.Module) -> dict:
        self.seen = [*getattr(self, "seen", []), copy.deepcopy(model)]
        return super().select_ranks(model)


def _energy_ranks(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    selector, tucker2 = rankopt.rank_selector("energy"), rankopt.decomposer("tucker2")
    return {n: tuple(selector.select(model.get_submodule(n), tucker2, p=0.95)) for n in names}


def test_regularizer_lowers_the_energy_ranks_at_bounded_accuracy_cost() -> None:
    reference, splits = trained_reference()
    convs = ["3", "7"]  # the two wide 3x3 convs of small_cnn
    runs = {}
    for alpha in (0.0, 0.03):
        ctx = RecordingContext(
            reference, splits, input_shape=(1, 1, 8, 8), device="cpu", seed=0, batch_size=64
        )
        outcome = rankopt.strategy("nrmf").run(
            ctx, {"alpha": alpha, "epochs": 3, "finetune_epochs": 0, "lr": 0.05}
        )
        trained = ctx.seen[-1]  # the regularized full model the final ranks came from
        runs[alpha] = (_energy_ranks(trained, convs), outcome)

    plain, plain_outcome = runs[0.0]
    regularized, outcome = runs[0.03]
    for name in convs:
        assert all(r < p for r, p in zip(regularized[name], plain[name])), (name, regularized, plain)
    # much lower, as in the paper's layer table: less than half the ranks overall
    assert sum(map(sum, regularized.values())) < 0.5 * sum(map(sum, plain.values()))
    # the compressed model is smaller and loses little accuracy
    ref_accuracy = make_context().evaluate(reference)
    assert outcome.extra["accuracy_before_compression"] >= ref_accuracy - 0.03
    assert outcome.extra["accuracy_after_compression"] >= ref_accuracy - 0.05
    params = {
        a: rankopt.count(o.model, input_shape=(1, 1, 8, 8)).params for a, (_, o) in runs.items()
    }
    assert params[0.03] < 0.6 * params[0.0]
    assert set(outcome.spec) >= set(plain_outcome.spec)
