"""DeepTwist: distortion makes the weights exactly low-rank; it makes compression (nearly) free."""

from __future__ import annotations

import pytest
import torch
from strategies_support import (
    AGGRESSIVE,
    make_context,
    plain_compression_loss,
    unfolding_rank,
)

import rankopt
from rankopt.plugins.strategies.deeptwist import distort


def test_distortion_makes_weights_exactly_low_rank_so_compression_is_lossless() -> None:
    ctx = make_context(**AGGRESSIVE)
    model = ctx.model().eval()
    spec = ctx.select_ranks(model)
    assert spec, "the fixed selector should compress the convs"
    distort(model, spec)
    for name, entry in spec.items():
        weight = model.get_submodule(name).weight
        r_in, r_out = entry["ranks"]
        assert unfolding_rank(weight, 1) <= r_in and unfolding_rank(weight, 0) <= r_out
    compressed = ctx.compress(model, spec).eval()
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(compressed(x), model(x), atol=1e-4)


def test_deeptwist_loses_less_at_compression_than_plain_training() -> None:
    epochs, lr = 3, 0.05
    plain_before, plain_after = plain_compression_loss(epochs, lr)
    ctx = make_context(**AGGRESSIVE)
    outcome = rankopt.strategy("deeptwist").run(
        ctx, {"distortion_steps": 10, "epochs": epochs, "lr": lr}
    )
    (result,) = ctx.train_results  # finetune_epochs=0: the distorted training only
    total_steps = result.steps
    assert result.epochs == epochs
    # one distortion every 10 steps, plus the last one when the run does not end on one
    assert outcome.extra["distortions"] == total_steps // 10 + (total_steps % 10 != 0)
    assert ctx.reported["deeptwist_distortions"] == outcome.extra["distortions"]
    before = outcome.extra.get("accuracy_before_last_distortion")
    after = outcome.extra["accuracy_after_compression"]
    assert after == outcome.extra["accuracy_before_compression"]  # exactly low-rank: lossless
    # plain training then compression at the same ranks loses a lot (> 10 points) ...
    assert plain_before - plain_after > 0.10
    # ... DeepTwist's weights keep their accuracy when decomposed at those ranks
    assert after > plain_after + 0.10
    assert before is None or before - after < plain_before - plain_after
    assert after >= plain_before - 0.03
    assert outcome.spec == ctx.select_ranks(ctx.model())  # ranks chosen once, on the reference


class _RecordingContext:
    """Wraps a context and keeps the trained model DeepTwist hands to ``compress``."""

    def __init__(self, ctx: object) -> None:
        self._ctx = ctx
        self.trained: list[torch.nn.Module] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._ctx, name)

    def compress(self, model: torch.nn.Module, spec: dict) -> torch.nn.Module:
        self.trained.append(model)
        return self._ctx.compress(model, spec)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("decomposer", "distortion_steps"),
    # 6: the run (12 steps) ends on a distortion, the case where CP used to decompose again
    [("tucker2", 6), ("cp", 6), ("tt", 5), ("svd", 6), ("tensor_ring", 6)],
)
def test_the_trained_model_and_the_compressed_model_compute_the_same_logits(
    decomposer: str, distortion_steps: int
) -> None:
    ctx = _RecordingContext(
        make_context(decomposers=decomposer, selector="fixed", selector_params={"fraction": 0.1})
    )
    outcome = rankopt.strategy("deeptwist").run(
        ctx, {"distortion_steps": distortion_steps, "epochs": 0.5, "lr": 0.05}  # type: ignore[arg-type]
    )
    (result,) = ctx.train_results
    assert (result.steps % distortion_steps == 0) == (distortion_steps == 6)
    assert outcome.spec and {e["decomposer"] for e in outcome.spec.values()} == {decomposer}
    (trained,) = ctx.trained
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = trained.eval()(x), outcome.model.eval()(x)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
    assert outcome.extra["accuracy_after_compression"] == outcome.extra["accuracy_before_compression"]


def test_a_decomposer_whose_module_cannot_reconstruct_is_refused_before_training() -> None:
    from rankopt.plugins.decomposers.svd import SVDDecomposer

    class Opaque(SVDDecomposer):
        name = "opaque_svd"

        def build(self, module, ranks, *, options=None, initialize=True):  # type: ignore[no-untyped-def]
            built = super().build(module, ranks, options=options, initialize=initialize)
            return torch.nn.Sequential(*built.children())  # the same layers, no reconstruct_weight

    class Plugin:
        @rankopt.hookimpl
        def rankopt_decomposers(self) -> list:
            return [rankopt.DecomposerInfo("opaque_svd", Opaque, "svd without reconstruct_weight")]

    rankopt.register_plugin(Plugin())
    try:
        ctx = make_context(decomposers="opaque_svd", **AGGRESSIVE)
        with pytest.raises(rankopt.ConfigError, match=r"deeptwist: the Sequential that decomposer 'opaque_svd' builds for layer '\d+' has no reconstruct_weight"):
            rankopt.strategy("deeptwist").run(ctx, {"distortion_steps": 5, "epochs": 1, "lr": 0.05})
        assert ctx.train_results == []  # nothing trained
    finally:
        rankopt.reset_registry()


def test_the_default_distortion_range_is_the_papers_scaled_to_the_run() -> None:
    from rankopt.plugins.strategies.deeptwist import scaled_distortion_steps

    strategy = rankopt.strategy("deeptwist")
    space = strategy.search_space()["distortion_steps"]
    assert (space.low, space.high) == (100, 5000)  # seed 002: "100 to 5000 steps"
    assert 100 <= strategy.defaults()["distortion_steps"] <= 5000
    # the rule: at most half the run's steps, so that every run distorts at least twice
    assert scaled_distortion_steps(5000, 40) == 20
    assert scaled_distortion_steps(200, 100_000) == 200
    assert scaled_distortion_steps(200, None) == 200
    ctx = make_context()
    outcome = strategy.run(ctx, {"epochs": 1.0, "finetune_epochs": 0.0})
    per_epoch = ctx.steps_per_epoch
    assert outcome.extra["distortion_steps_used"] == per_epoch // 2
    assert outcome.extra["distortions"] >= 2
