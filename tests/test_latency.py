"""The per-layer speed check: a decomposed layer slower than its original is kept full."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.compression.latency import keep_faster_layers, measure_latency
from rankopt.training.trial import LocalTrialContext


class TinyAndWide(nn.Module):
    """``tiny`` sees a 2x2 map (call overhead dominates: three convs cost more than one);
    ``wider`` is 256 -> 256 at 8x8 (rank 16 removes almost all of its multiply-adds)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 256, 1)
        self.tiny = nn.Conv2d(4, 4, 3, padding=1)
        self.wider = nn.Conv2d(256, 256, 3, padding=1)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        t = self.tiny(h[:, :4, :2, :2]).mean()
        return self.head(self.wider(h).mean(dim=(2, 3))) + t

SPEC = {
    "tiny": {"decomposer": "tucker2", "ranks": [2, 2]},     # 52 vs 144 MACs per pixel, yet slower
    "wider": {"decomposer": "tucker2", "ranks": [16, 16]},
}


def test_slower_factorized_layers_are_dropped_and_faster_ones_kept() -> None:
    model = TinyAndWide()
    layers = rankopt.find_layers(model, (1, 1, 8, 8))
    for name, entry in SPEC.items():  # both reduce the layer's FLOPs
        info = next(i for i in layers if i.name == name)
        dec = rankopt.decomposer("tucker2")
        assert dec.cost(model.get_submodule(name), entry["ranks"], input_hw=info.input_hw).flops < info.cost.flops
    kept, dropped = keep_faster_layers(model, SPEC, layers, repeats=10)
    assert set(kept) == {"wider"}
    assert set(dropped) == {"tiny"}
    assert "kept full: tucker2 [2, 2]" in dropped["tiny"] and "ms" in dropped["tiny"]


def test_measure_latency_restores_the_mode_and_is_positive() -> None:
    conv = nn.Conv2d(3, 8, 3).train()
    assert measure_latency(conv, torch.zeros(1, 3, 16, 16), repeats=3) > 0
    assert conv.training


def test_trial_context_keeps_the_faster_form_and_reports_why() -> None:
    splits = rankopt.dataset("digits")
    net = TinyAndWide()
    targets = rankopt.find_layers(net, (1, 1, 8, 8), include=["tiny", "wider"])
    kwargs = dict(input_shape=(1, 1, 8, 8), targets=targets, device="cpu", decomposers="tucker2",
                  selector="fixed", selector_params={"ranks": {k: v["ranks"] for k, v in SPEC.items()}})
    plain = LocalTrialContext(net, splits, **kwargs)
    assert set(plain.select_ranks(plain.model())) == {"tiny", "wider"}
    checked = LocalTrialContext(net, splits, keep_faster=True, **kwargs)
    assert set(checked.select_ranks(checked.model())) == {"wider"}
    assert "tiny" in checked.reported["kept_full_for_speed"]


def test_interleaved_timing_never_times_a_function_right_after_itself(monkeypatch) -> None:
    """A function timed right after itself runs with warm caches: the old ABCD/DCBA order
    did that to A and D every other round (two copies of one model measured 1.08-1.10x
    apart in ONNX Runtime). Each sample's first call must follow another function, and
    over the rounds every function must follow every other."""
    import itertools
    import time as time_module

    from rankopt.compression.latency import time_interleaved

    clock = [0.0]
    calls: list[int] = []
    monkeypatch.setattr(time_module, "process_time", lambda: clock[0])

    def make(i: int):
        def fn() -> None:
            # 1 ms cold, 0.5 ms right after itself (a warm cache)
            clock[0] += 0.0005 if calls and calls[-1] == i else 0.001
            calls.append(i)
        return fn

    fns = [make(i) for i in range(4)]
    medians = time_interleaved(fns, rounds=40, warmup=0, min_sample_s=1e-9)
    timed = calls[4:]  # after the one calibration call each
    assert len(timed) == 160
    assert all(a != b for a, b in zip(timed, timed[1:]))
    assert {(a, b) for a, b in zip(timed, timed[1:])} == set(itertools.permutations(range(4), 2))
    assert medians == pytest.approx([0.001] * 4)  # four identical functions measure alike
    # seeded: the same order every time
    calls.clear()
    assert time_interleaved(fns, rounds=40, warmup=0, min_sample_s=1e-9) == medians
    assert calls[4:] == timed
