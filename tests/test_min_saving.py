"""targets.min_saving (issue 14): a factorized form that saves less than a share of a
layer's params or FLOPs leaves the layer dense, in studies by default (0.1)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.compression.accounting import Cost
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError
from rankopt.compression.selection import cost_increase_reason, select_spec
from study_support import RANDOM, small_study

INPUT = (1, 8, 12, 12)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 40, 3, padding=1)
        self.fc = nn.Linear(40, 100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_the_boundary_is_exact_for_params_and_flops() -> None:
    original = Cost(10_000, 50_000)
    # saving exactly 10 % is enough, one parameter (or FLOP) more is not
    assert cost_increase_reason("svd", (9,), Cost(9_000, 45_000), original, True, 0.1) is None
    why = cost_increase_reason("svd", (9,), Cost(9_001, 40_000), original, True, 0.1)
    assert why is not None and "would save 10.0% of the layer's parameters (9,001 of 10,000)" in why
    assert "targets.min_saving=0.1" in why and "targets.min_saving: 0" in why
    why = cost_increase_reason("svd", (9,), Cost(8_000, 45_001), original, True, 0.1)
    assert why is not None and "FLOPs (45,001 of 50,000)" in why
    # FLOPs unknown: only the params count; min_saving 0 keeps the old rule (strictly smaller)
    assert cost_increase_reason("svd", (9,), Cost(8_000, 0), Cost(10_000, 0), False, 0.1) is None
    assert cost_increase_reason("svd", (9,), Cost(9_999, 49_000), original, True, 0.0) is None


def test_near_full_ranks_leave_the_layer_dense_and_say_why() -> None:
    torch.manual_seed(0)
    net = Net()
    layers = rankopt.find_layers(net, INPUT)
    decs = {"conv": "tucker2", "fc": "svd"}
    # fc (40 -> 100, 4,100 params) at SVD rank r keeps 140 r + 100:
    # rank 27 keeps 27 * 140 + 100 = 3,880 of 4,100 (5.4 % saved), rank 25 3,600 (12.2 %)
    for rank, compressed in ((27, False), (25, True)):
        spec, choices = select_spec(net, layers, {"fc": "svd"}, "fixed", {"ranks": {"fc": [rank]}},
                                    min_saving=0.1)
        assert ("fc" in spec) is compressed, rank
        if not compressed:
            why = next(c for c in choices if c.name == "fc").reason
            assert "would save 5.4% of the layer's parameters (3,880 of 4,100)" in why
        spec, _ = select_spec(net, layers, {"fc": "svd"}, "fixed", {"ranks": {"fc": [rank]}})
        assert "fc" in spec  # the library default, 0: any saving
    spec, _ = select_spec(net, layers, decs, "energy", {"p": 0.9999}, min_saving=0.1)
    assert spec == {}


def test_studies_default_to_0_1_and_bad_values_name_the_field() -> None:
    assert load_config({"name": "s", "trials": 1}, check_plugins=False).targets.min_saving == 0.1
    for bad in (1.0, -0.1, "x"):
        with pytest.raises(ConfigError, match="min_saving"):
            load_config({"name": "s", "trials": 1, "targets": {"min_saving": bad}}, check_plugins=False)
    net = Net()
    with pytest.raises(ConfigError, match=r"min_saving must be a number in \[0, 1\), got 1.5"):
        select_spec(net, rankopt.find_layers(net, INPUT), {"fc": "svd"}, "fixed", {}, min_saving=1.5)


def _study(tmp_path: Path, **changes: object) -> dict[str, object]:
    # small_cnn(width=8): at 0.85 only its 16 -> 16 conv shrinks, to Tucker-2 14 x 14,
    # which keeps 2,212 of its 2,304 params (4 % saved)
    config: dict[str, object] = small_study(
        "saving", tmp_path, **{"reference": {"epochs": 0.2, "lr": 0.05}, "trials": 2, "seed_proposals": False,
                               "selectors": {"fixed": {"fraction": {"low": 0.1, "high": 1.0}}},
                               "strategies": {"finetune": {"epochs": 0.05, "lr": 0.01}},
                               "enqueue": [{"fixed.fraction": 0.85}, {"fixed.fraction": 0.5}], "sampler": RANDOM,
                               **changes})
    return config


def test_a_study_keeps_dense_what_would_save_too_little(tmp_path: Path) -> None:
    # with the default 0.1 the near-full trial's model is the reference's; with
    # min_saving 0 the same fraction decomposes the layer
    result = rankopt.run_study(_study(tmp_path / "a"), progress=False)
    near_full, cut = sorted(result.trials(), key=lambda r: r.trial)
    assert near_full.spec == {} and near_full.params == result.reference["params"]
    assert cut.spec and cut.params <= 0.9 * result.reference["params"]
    result = rankopt.run_study(_study(tmp_path / "b", targets={"min_saving": 0.0}), progress=False)
    near_full = min(result.trials(), key=lambda r: r.trial)
    assert near_full.spec == {"7": {"decomposer": "tucker2", "ranks": [14, 14]}}
    assert near_full.params == result.reference["params"] - 2_304 + 2_212


def test_inspect_marks_ranks_that_save_too_little_and_takes_min_saving(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from rankopt.cli import main

    def rows(*extra: str) -> dict[tuple[str, str], dict[str, object]]:
        args = ["inspect", "small_cnn", "--num-classes", "10", "--input-shape", "1,1,8,8",
                "--thresholds", ",".join(str(p / 100) for p in range(80, 100)), "--format", "json", *extra]
        assert main(args) == 0
        layers = json.loads(capsys.readouterr().out)["layers"]
        return {(r["layer"], m): e for r in layers for m, e in r["methods"].items()}

    default, zero = rows(), rows("--min-saving", "0")
    changed = [key for key in default if default[key]["compressed"] != zero[key]["compressed"]]
    assert changed  # some threshold gives ranks that save under 10 %
    for key in changed:
        assert zero[key]["compressed"] and not default[key]["compressed"]
        assert "less than targets.min_saving=0.1" in default[key]["reason"]  # type: ignore[operator]
    assert main(["inspect", "small_cnn", "--min-saving", "1"]) == 2
    assert "--min-saving must be a number in [0, 1), got 1.0" in capsys.readouterr().err
