"""`rankopt inspect`: the per-layer rank table of a model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

import rankopt
from rankopt.cli import app, main

runner = CliRunner()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    # shared with test_selectors_budget.py: the same seeded ResNet-18, spectra computed once
    return str(Path(tmp_path_factory.getbasetemp()) / "resnet18-seed0-spectra")


def _run(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _resnet18_seed0() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return rankopt.model("resnet18", num_classes=10).eval()


def test_inspect_resnet18_table_and_json_agree_with_decomposer_cost(cache_dir: str) -> None:
    common = ("resnet18", "--num-classes", "10", "--input-shape", "1,3,32,32", "--cache-dir", cache_dir)
    table = _run("inspect", *common)
    for needle in ("layer4.1.conv2", "vbmf", "p=0.92", "p=0.95", "p=0.98", "kept full", "model"):
        assert needle in table
    data = json.loads(_run("inspect", *common, "--format", "json"))
    assert data["methods"] == ["vbmf", "energy@0.92", "energy@0.95", "energy@0.98"]
    model = _resnet18_seed0()
    dec = rankopt.decomposer("tucker2")
    infos = {la.name: la for la in rankopt.find_layers(model, (1, 3, 32, 32))}
    convs = [row for row in data["layers"] if row["kind"] == "conv2d"]
    assert len(convs) == 20 and data["layers"][-1]["layer"] == "fc" and not data["layers"][-1]["methods"]
    for row in convs:
        module = model.get_submodule(row["layer"])
        assert (row["S"], row["T"], row["params"]) == (module.in_channels, module.out_channels, module.weight.numel())
        for method, entry in row["methods"].items():
            cost = dec.cost(module, entry["ranks"], infos[row["layer"]].input_hw)
            assert (entry["params"], entry["flops"]) == (cost.params, cost.flops), (row["layer"], method)
            assert entry["ratio"] == pytest.approx(row["params"] / cost.params)
            # a study's rule: at least targets.min_saving (0.1) of params and FLOPs saved
            # and a thin stem (fewer than 4 input channels) stays dense
            saves = cost.params <= 0.9 * row["params"] and cost.flops <= 0.9 * row["flops"]
            saves = saves and not row.get("dense")
            assert entry["compressed"] == saves and ("reason" in entry) == (not saves)
        # energy ranks grow with p; VBMF finds pure noise in a random init: the floor
        ranks = [tuple(row["methods"][m]["ranks"]) for m in data["methods"][1:]]
        assert all(all(a <= b for a, b in zip(x, y)) for x, y in zip(ranks, ranks[1:]))
        assert row["methods"]["vbmf"]["ranks"] == [1, 1]
    assert data["total"]["params"] == sum(p.numel() for p in model.parameters())


def test_inspect_csv_has_a_row_per_layer(cache_dir: str) -> None:
    out = _run("inspect", "resnet18", "--num-classes", "10", "--input-shape", "1,3,32,32",
               "--cache-dir", cache_dir, "--format", "csv", "--thresholds", "0.9")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 21
    assert rows[0]["layer"] == "conv1" and rows[0]["kernel"] == "7x7"
    assert set(rows[0]) >= {"vbmf_ranks", "energy@0.9_ranks", "energy@0.9_params", "energy@0.9_ratio"}


def test_inspect_a_callable_with_weights_and_a_study_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "inspect_models.py"
    module.write_text(
        "import torch.nn as nn\n"
        "def net(num_classes=3) -> nn.Module:  # rankopt calls only annotated model factories\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(),\n"
        "                         nn.LazyLinear(num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # weights: a second conv of multilinear rank (2, 2) with equal mode spectra must show
    # up as ranks (2, 2) for every method
    import inspect_models

    torch.manual_seed(0)
    net = inspect_models.net(num_classes=4)
    net(torch.zeros(1, 3, 8, 8))
    u_out, u_in = torch.linalg.qr(torch.randn(16, 2))[0], torch.linalg.qr(torch.randn(16, 2))[0]
    kernel = torch.randn(3, 3)
    with torch.no_grad():
        net[2].weight.copy_(torch.einsum("ta,sa,ij->tsij", u_out, u_in, kernel / kernel.norm()))
    torch.save(net.state_dict(), tmp_path / "w.pt")
    args = ["inspect", "inspect_models:net", "--num-classes", "4", "--input-shape", "1,3,8,8",
            "--weights", str(tmp_path / "w.pt"), "--format", "json"]
    data = json.loads(_run(*args))
    second = data["layers"][1]
    assert second["layer"] == "2" and all(second["methods"][m]["ranks"] == [2, 2] for m in data["methods"])

    study = tmp_path / "study.yaml"
    study.write_text(
        "name: inspect-me\n"
        "model: {name: 'inspect_models:net', kwargs: {num_classes: 4}}\n"
        f"reference: {{weights: {str(tmp_path / 'w.pt')!r}}}\n"
    )
    from_study = json.loads(_run("inspect", str(study), "--input-shape", "1,3,8,8", "--format", "json"))
    assert from_study["layers"] == data["layers"]


def test_inspect_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = [
        (["inspect", "small_cnn", "--format", "xml"], "--format must be one of"),
        (["inspect", "no_such_model"], "unknown model 'no_such_model'"),
        (["inspect", "small_cnn", "--input-shape", "1,x"], "--input-shape"),
        (["inspect", "small_cnn", "--thresholds", "0.9,1.5"], "--thresholds must be numbers in (0, 1]"),
        (["inspect", "small_cnn", "--weights", str(tmp_path / "missing.pt")], "does not exist"),
        (["inspect", "small_cnn", "--decomposer", "nope"], "unknown decomposer 'nope'"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err


def test_inspect_layers_from_python_is_what_the_cli_prints(cache_dir: str) -> None:
    # the layer table is a public function; `rankopt inspect --format json` only renders it
    model = rankopt.model("small_cnn", in_channels=3)
    table = rankopt.inspect_layers(model, input_shape=(1, 3, 32, 32), thresholds=(0.95,), cache_dir=Path(cache_dir))
    assert isinstance(table, rankopt.LayerTable) and table.trained and table.methods == ["vbmf", "energy@0.95"]
    names = [la.name for la in rankopt.find_layers(model, (1, 3, 32, 32))]
    assert [row["layer"] for row in table.layers] == names
    assert table.to_csv().count("\n") == len(names) + 1
    by_name = rankopt.inspect_layers("resnet18", num_classes=10, input_shape=(1, 3, 32, 32), cache_dir=Path(cache_dir))
    printed = json.loads(_run("inspect", "resnet18", "--num-classes", "10", "--input-shape", "1,3,32,32",
                              "--cache-dir", cache_dir, "--format", "json"))
    assert printed == json.loads(json.dumps(by_name.as_dict()))
    with pytest.raises(rankopt.ConfigError, match="thresholds"):
        rankopt.inspect_layers(model, thresholds=(1.5,))
