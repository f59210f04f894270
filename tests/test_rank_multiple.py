"""rank_multiple: every selector's and the search's ranks are multiples (or the layer's
largest rank); thin stems stay dense by default in studies."""

from __future__ import annotations

import optuna
import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.config.schema import load_config
from rankopt.core.errors import ConfigError
from rankopt.contract.selector import round_ranks
from rankopt.search.space import SearchSpace
from rankopt.compression.selection import select_spec
from rankopt.training.trial import LocalTrialContext

INPUT = (1, 3, 16, 16)


class Net(nn.Module):
    """A 3-channel stem, two wide convs (ranks up to 40/48) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 40, 3, padding=1)
        self.conv1 = nn.Conv2d(40, 48, 3, padding=1)
        self.conv2 = nn.Conv2d(48, 44, 3, padding=1)
        self.fc = nn.Linear(44, 36)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(torch.relu(self.stem(x))))))
        return self.fc(x.mean(dim=(2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # a decaying spectrum, so each selector picks varied ranks
        for m in (net.conv1, net.conv2, net.fc):
            w = m.weight.reshape(m.weight.shape[0], -1)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            s = s * torch.logspace(0, -2, len(s))
            m.weight.copy_((u @ torch.diag(s) @ vh).reshape(m.weight.shape))
    return net


def _check(spec: dict, net: nn.Module, multiple: int) -> None:
    assert spec, "nothing compressed: the test would prove nothing"
    for name, entry in spec.items():
        largest = rankopt.decomposer(entry["decomposer"]).max_ranks(net.get_submodule(name))
        for r, hi in zip(entry["ranks"], largest):
            assert r % multiple == 0 or r == hi, (name, entry, largest)


def test_round_ranks() -> None:
    assert round_ranks([1, 4, 5, 11, 12, 13, 40], [48] * 6 + [36], 8) == (8, 8, 8, 8, 16, 16, 36)
    assert round_ranks([3, 7], [5, 9], 1) == (3, 7)


@pytest.mark.parametrize(
    ("selector", "params"),
    [
        ("energy", {"p": 0.9}),
        ("vbmf", {}),
        ("fixed", {"fraction": 0.3}),
        ("budget", {}),
        ("approx_ratio", {}),
    ],
)
def test_every_selector_gives_multiples_of_8(selector: str, params: dict) -> None:
    net = _net()
    layers = rankopt.find_layers(net, INPUT)
    decs = {la.name: ("svd" if la.kind == "linear" else "tucker2") for la in layers}
    plain, _ = select_spec(net, layers, decs, selector, params, input_shape=INPUT)
    spec, choices = select_spec(net, layers, decs, selector, params, input_shape=INPUT, rank_multiple=8)
    _check(spec, net, 8)
    rounded = 0
    for name, entry in plain.items():  # the same layers, each rank moved to its nearest multiple
        largest = rankopt.decomposer(entry["decomposer"]).max_ranks(net.get_submodule(name))
        for r, r8, hi in zip(entry["ranks"], spec[name]["ranks"], largest):
            assert r8 == min(hi, max(8, 8 * round(r / 8 + 1e-9))) or (r8 == hi and r > hi - 4)
            rounded += r != r8
    assert rounded  # every selector here picks some rank that is not a multiple of 8


def test_the_search_space_gives_multiples_of_8() -> None:
    net = _net()
    config = load_config(
        {
            "name": "rm",
            "decomposers": ["tucker2", "cp"],
            "selectors": {"fixed": {"fraction": {"low": 0.05, "high": 1.0}}, "energy": {"p": {"low": 0.5, "high": 0.99}}},
            "rank_multiple": 8,
            "trials": 1,
        },
        check_plugins=False,
    )
    layers = rankopt.find_layers(net, INPUT)
    space = SearchSpace(config, net, layers)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = 0
    for _ in range(12):
        plan = space.plan(space.suggest(study.ask()))
        ctx = LocalTrialContext(
            net, rankopt.dataset("digits"), input_shape=INPUT, targets=layers, decomposers=plan.decomposers,
            selector=plan.selector, selector_params=plan.selector_params, device="cpu",
            rank_multiple=config.rank_multiple, min_in_channels=config.targets.dense_input_channels + 1,
        )
        spec = ctx.select_ranks(ctx.model())
        if spec:
            _check(spec, net, 8)
            seen += 1
        assert "stem" not in spec
    assert seen >= 6


def test_a_3_channel_stem_stays_dense_by_default_and_says_why() -> None:
    net = _net()
    layers = rankopt.find_layers(net, INPUT)
    config = load_config({"name": "s", "trials": 1}, check_plugins=False)
    assert (config.targets.dense_input_channels, config.rank_multiple) == (3, "auto")
    spec, choices = select_spec(
        net, layers, {"stem": "tucker2", "conv1": "tucker2"}, "fixed", {"fraction": 0.25},
        min_in_channels=config.targets.dense_input_channels + 1,
    )
    assert set(spec) == {"conv1"}
    why = next(c for c in choices if c.name == "stem").reason
    assert "3 input channel(s), fewer than min_in_channels=4" in why and "targets.dense_input_channels: 0" in why
    # asked for, it is compressed
    spec, _ = select_spec(net, layers, {"stem": "tucker2"}, "fixed", {"fraction": 0.25}, min_in_channels=1)
    assert set(spec) == {"stem"}


def test_inspect_says_why_the_stem_stays_dense(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from rankopt.cli import main

    assert main(["inspect", "resnet18", "--num-classes", "10", "--input-shape", "1,3,32,32", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert rows[0]["layer"] == "conv1" and rows[0]["dense"] is True
    assert "kept dense by studies: 3 input channel(s) < min_in_channels 4" in rows[0]["note"]
    assert not any(r.get("dense") for r in rows[1:])


@pytest.mark.parametrize(("field", "value"), [("rank_multiple", 0), ("min_in_channels", 0), ("rank_multiple", "8x")])
def test_bad_values_name_the_field(field: str, value: object) -> None:
    study_field = {"rank_multiple": "rank_multiple", "min_in_channels": "dense_input_channels"}[field]
    fields = {field: value} if field == "rank_multiple" else {"targets": {"dense_input_channels": -1}}
    with pytest.raises(ConfigError, match=study_field):
        load_config({"name": "s", "trials": 1, **fields}, check_plugins=False)
    net = _net()
    layers = rankopt.find_layers(net, INPUT)
    with pytest.raises(ConfigError, match=rf"{field} must be an integer >= 1, got {value!r}"):
        select_spec(net, layers, {"conv1": "tucker2"}, "fixed", {}, **{field: value})


def test_inspect_follows_the_study_files_min_in_channels(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import yaml

    from rankopt.cli import main

    def dense_layers(*args: str) -> list[str]:
        assert main(["inspect", *args, "--input-shape", "1,1,8,8", "--format", "json"]) == 0
        return [r["layer"] for r in json.loads(capsys.readouterr().out)["layers"] if r.get("dense")]

    study = {"name": "s", "model": {"name": "small_cnn", "kwargs": {"width": 8}}, "trials": 1}
    default, asked = tmp_path / "default.yaml", tmp_path / "asked.yaml"
    default.write_text(yaml.safe_dump(study))
    asked.write_text(yaml.safe_dump({**study, "targets": {"dense_input_channels": 0}}))
    assert dense_layers(str(default)) == ["0"]  # the 1-channel stem
    assert dense_layers(str(asked)) == []
    assert dense_layers(str(asked), "--min-in-channels", "9") == ["0", "3"]  # 1 and 8 input channels
    assert main(["inspect", "small_cnn", "--min-in-channels", "0"]) == 2
    err = capsys.readouterr().err
    assert "--min-in-channels must be an integer >= 1, got 0" in err and len(err.strip().splitlines()) == 1


def test_auto_aligns_only_layers_large_enough_and_follows_the_device() -> None:
    from rankopt.contract.selector import RankAlignment, auto_rank_alignment

    assert auto_rank_alignment("cuda") == RankAlignment(8, 32, exact_below=True)
    cpu = auto_rank_alignment("cpu")
    assert cpu.multiple in (4, 8, 16) and cpu.min_largest == 4 * cpu.multiple and cpu.exact_below
    # under auto a rank below one multiple stays exact (rank 3 is not made 8); above, rounded
    assert auto_rank_alignment("cuda").apply((3, 13), (48, 40)) == (3, 16)
    assert RankAlignment(8, 32).apply((3, 13), (48, 40)) == (8, 16)  # an integer rank_multiple
    align = RankAlignment(8, 32)
    assert align.apply((13, 21), (48, 40)) == (16, 24)  # a layer wide enough: rounded
    assert align.apply((13, 21), (48, 24)) == (13, 21)  # one mode too small: exact ranks
    net = _net()
    layers = rankopt.find_layers(net, INPUT)
    decs = {la.name: ("svd" if la.kind == "linear" else "tucker2") for la in layers}
    plain, _ = select_spec(net, layers, decs, "fixed", {"fraction": 0.3}, input_shape=INPUT)
    aligned, _ = select_spec(net, layers, decs, "fixed", {"fraction": 0.3}, input_shape=INPUT,
                             rank_multiple=RankAlignment(8, 44))
    # conv1 (largest 40, 48) is under 44 and keeps its ranks; conv2 (48, 44) is rounded
    assert aligned["conv1"]["ranks"] == plain["conv1"]["ranks"]
    assert aligned["conv2"]["ranks"] != plain["conv2"]["ranks"]
    assert all(r % 8 == 0 for r in aligned["conv2"]["ranks"])


def test_a_study_resolves_auto_on_its_device() -> None:
    from rankopt.config.schema import resolve_rank_multiple
    from rankopt.contract.selector import auto_rank_alignment

    config = load_config({"name": "rm", "trials": 1, "device": "cpu"}, check_plugins=False)
    assert config.rank_multiple == "auto"
    assert resolve_rank_multiple(config) == auto_rank_alignment("cpu")
    assert resolve_rank_multiple(load_config({"name": "rm", "rank_multiple": 8}, check_plugins=False)) == 8
