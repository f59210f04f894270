"""NRMF: the nuclear-norm penalty, and its effect on the selected ranks on real data (digits)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from strategies_support import make_context, trained_reference

import rankopt
from rankopt.plugins.strategies.nrmf import nuclear_norm_penalty
from rankopt.training.trial import LocalTrialContext


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


class _SourcesContext(LocalTrialContext):
    """Records what NRMF selects ranks on and what it compresses."""

    def select_ranks(self, model: nn.Module) -> dict:
        self.ranked_on = copy.deepcopy(model)
        return super().select_ranks(model)

    def compress(self, model: nn.Module, spec: dict) -> nn.Module:
        self.compressed_from = copy.deepcopy(model)
        return super().compress(model, spec)


def test_ranks_and_initialization_come_from_the_model_each_option_names() -> None:
    """The four rows of seed 000's table: ranks from / factors from {reference, regularized}."""
    reference, splits = trained_reference()
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_logits = reference(x)
    seen = {}
    for ranks_from in ("reference", "regularized"):
        for init_from in ("reference", "regularized"):
            ctx = _SourcesContext(
                reference, splits, input_shape=(1, 1, 8, 8), device="cpu", seed=0, batch_size=64
            )
            outcome = rankopt.strategy("nrmf").run(
                ctx,
                {"alpha": 0.03, "epochs": 0.5, "finetune_epochs": 0, "lr": 0.05,
                 "ranks_from": ranks_from, "init_from": init_from},
            )
            with torch.no_grad():
                ranked, source = ctx.ranked_on.eval()(x), ctx.compressed_from.eval()(x)
            assert torch.equal(ranked, ref_logits) == (ranks_from == "reference")
            assert torch.equal(source, ref_logits) == (init_from == "reference")
            seen[ranks_from, init_from] = {n: tuple(e["ranks"]) for n, e in outcome.spec.items()}
    # ranks depend on where they were selected only; the regularized weights need fewer
    assert seen["reference", "reference"] == seen["reference", "regularized"]
    assert seen["regularized", "reference"] == seen["regularized", "regularized"]
    assert sum(map(sum, seen["regularized", "regularized"].values())) < sum(
        map(sum, seen["reference", "reference"].values())
    )
    with pytest.raises(rankopt.ConfigError, match=r"'init_from' must be one of \['regularized', 'normal', 'reference'\], got 'vbmf'"):
        rankopt.strategy("nrmf").validate_params({"init_from": "vbmf"})


class _TrainCountingContext(LocalTrialContext):
    """Records (epochs, lr, regularized?) of every train call."""

    calls: list[tuple[float, float, bool]]

    def train(self, model: nn.Module, **kw: Any):  # type: ignore[override]
        self.calls = [*getattr(self, "calls", []), (kw["epochs"], kw["lr"], kw.get("extra_loss") is not None)]
        return super().train(model, **kw)


@pytest.mark.parametrize("ranks_from", ["regularized", "normal"])
@pytest.mark.parametrize("init_from", ["regularized", "normal"])
def test_the_four_rows_of_the_table_get_equal_training(ranks_from: str, init_from: str) -> None:
    """Seed 000's rows: the normal model is the same start trained as long without the regularizer."""
    reference, splits = trained_reference()
    ctx = _TrainCountingContext(reference, splits, input_shape=(1, 1, 8, 8), device="cpu", seed=0, batch_size=64)
    hp = {"alpha": 0.03, "epochs": 0.5, "finetune_epochs": 0.25, "lr": 0.05,
          "ranks_from": ranks_from, "init_from": init_from}
    outcome = rankopt.strategy("nrmf").run(ctx, hp)
    normal = "normal" in (ranks_from, init_from)
    expected = [(0.5, 0.05, True)] + ([(0.5, 0.05, False)] if normal else []) + [(0.25, 0.05, False)]
    assert ctx.calls == expected
    assert ("accuracy_normal" in outcome.extra) == normal
