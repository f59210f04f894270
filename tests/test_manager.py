"""The plugin registry: entry-point discovery, listing, lookups, name conflicts, autoload switch.

Third-party plugins come from the fixture distributions in ``fixtures/plugin_dists``
(a ``.dist-info`` with an ``entry_points.txt`` next to the module), found through
``importlib.metadata`` exactly as an installed package is.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from fixtures.plugin_env import plugin_env  # noqa: F401  (pytest fixture)

import rankopt
from rankopt.cli import main
from rankopt.core.errors import DuplicateNameError, UnknownNameError
from rankopt.contract.manager import AUTOLOAD_ENV, FAMILIES, Registry

GOOD_NAMES = {
    "decomposers": "fixture_lowrank",
    "rank_selectors": "fixture_half",
    "strategies": "fixture_compress_only",
    "models": "fixture_mlp",
    "datasets": "fixture_blobs",
}


def plugins_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["plugins", "--format", "json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_plugin_names_has_every_family_and_the_builtins():
    rankopt.reset_registry()
    names = rankopt.plugin_names()
    assert list(names) == list(FAMILIES)
    assert {"tucker2", "cp", "tt", "svd"} <= set(names["decomposers"])
    assert {"energy", "fixed", "vbmf", "approx_ratio", "budget"} <= set(names["rank_selectors"])
    assert {"finetune", "nrmf", "deeptwist", "admm", "tdlrt"} <= set(names["strategies"])
    assert all(v == sorted(v) for v in names.values())


def test_entry_point_plugin_is_listed_and_usable(plugin_env):  # noqa: F811
    before = rankopt.plugin_names()
    assert GOOD_NAMES["decomposers"] not in before["decomposers"]
    plugin_env.activate("good")
    names = rankopt.plugin_names()
    for family, name in GOOD_NAMES.items():
        assert name in names[family], family
        source = rankopt.get_registry().source_of(family, name)
        assert (source.distribution, source.version, source.builtin) == ("rankopt-fixture-good", "0.3.1", False)
    assert set(names["decomposers"]) >= set(before["decomposers"])  # the built-ins stay

    dec = rankopt.decomposer("fixture_lowrank")
    assert type(dec).__name__ == "LowRankLinearDecomposer"
    torch.manual_seed(0)
    net = rankopt.model("fixture_mlp")
    splits = rankopt.dataset("fixture_blobs", n=30)
    assert (len(splits.train), splits.num_classes) == (30, 3)
    x = torch.stack([splits.val[i][0] for i in range(4)])
    full = rankopt.compress(net, {"1": {"decomposer": "fixture_lowrank", "ranks": [12]}})
    assert torch.allclose(full(x), net(x), atol=1e-5)  # full rank: the same function
    small = rankopt.compress(net, {"1": {"decomposer": "fixture_lowrank", "ranks": [3]}})
    assert rankopt.count(small, (1, 1, 4, 4)).params == rankopt.count(net, (1, 1, 4, 4)).params - 16 * 12 + 3 * (16 + 12)
    half = rankopt.rank_selector("fixture_half").select(net[1], dec)
    assert half == (6,)


def test_cli_lists_plugins_with_family_distribution_version_description(plugin_env, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COLUMNS", "250")  # rich reads it on every print
    plugin_env.activate("good")
    code, out = plugins_json(capsys)
    assert code == 0
    rows = {(r["family"], r["name"]): r for r in out["plugins"]}
    assert rows[("decomposer", "fixture_lowrank")] == {
        "family": "decomposer",
        "name": "fixture_lowrank",
        "distribution": "rankopt-fixture-good",
        "version": "0.3.1",
        "description": "Low-rank Linear layers by truncated SVD (test fixture)",
    }
    assert rows[("rank selector", "fixture_half")]["distribution"] == "rankopt-fixture-good"
    assert rows[("decomposer", "tucker2")]["distribution"] == "rankopt"
    assert out["failures"] == [] and out["conflicts"] == []

    capsys.readouterr()
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    line = next(ln for ln in table.splitlines() if "fixture_lowrank" in ln)
    for cell in ("decomposer", "rankopt-fixture-good", "0.3.1", "Low-rank"):
        assert cell in line


def test_unknown_name_fails_listing_the_known_ones():
    rankopt.reset_registry()
    with pytest.raises(UnknownNameError) as info:
        rankopt.decomposer("tucker3")
    message = str(info.value)
    assert "unknown decomposer 'tucker3'" in message
    for known in rankopt.plugin_names()["decomposers"]:
        assert repr(known) in message
    with pytest.raises(UnknownNameError, match="known strategies are .*'finetune'"):
        rankopt.strategy("fine_tune")
    with pytest.raises(UnknownNameError, match="unknown plugin family 'decomposerz'"):
        rankopt.get_registry().names("decomposerz")


def test_two_plugins_claiming_one_name_fail_naming_both(plugin_env, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COLUMNS", "250")
    plugin_env.activate("good", "duplicate")
    with pytest.raises(DuplicateNameError) as info:
        rankopt.decomposer("fixture_lowrank")
    message = str(info.value)
    assert "rankopt-fixture-good 0.3.1" in message and "rankopt-fixture-duplicate 0.5.0" in message
    assert "claimed by more than one plugin" in message
    assert "uninstall one of them" in message and "rename your decomposer" in message  # users and authors
    assert rankopt.decomposer("tucker2").name == "tucker2"  # other names are unaffected

    code, out = plugins_json(capsys)
    assert code == 0
    (conflict,) = out["conflicts"]
    assert (conflict["family"], conflict["name"]) == ("decomposer", "fixture_lowrank")
    assert sorted(conflict["providers"]) == [
        "rankopt-fixture-duplicate:duplicate (rankopt-fixture-duplicate 0.5.0)",
        "rankopt-fixture-good:fixtures (rankopt-fixture-good 0.3.1)",
    ]
    capsys.readouterr()
    main(["plugins"])
    text = capsys.readouterr().out
    assert "conflict: decomposer 'fixture_lowrank' is claimed by" in " ".join(text.split())
    assert "uninstall one of them; if you wrote one, rename your decomposer" in " ".join(text.split())


def test_an_in_process_plugin_shadowing_a_builtin_is_a_conflict_too():
    class Shadow:
        __name__ = "shadow_plugin"

        @rankopt.hookimpl
        def rankopt_decomposers(self):
            return [rankopt.DecomposerInfo("tucker2", object, "not really")]

    rankopt.register_plugin(Shadow())
    try:
        with pytest.raises(DuplicateNameError, match=r"rankopt\.plugins\.decomposers\.tucker2 \(rankopt .*\) and shadow_plugin"):
            rankopt.decomposer("tucker2")
    finally:
        rankopt.reset_registry()
    assert rankopt.decomposer("tucker2").name == "tucker2"  # reset_registry forgets it


def test_autoload_switch_keeps_the_builtins_and_drops_entry_points(plugin_env, monkeypatch):  # noqa: F811
    plugin_env.activate("good", "broken_import")
    assert "fixture_lowrank" in rankopt.plugin_names()["decomposers"]
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    rankopt.reset_registry()
    names = rankopt.plugin_names()
    assert "fixture_lowrank" not in names["decomposers"]
    assert "tensor_ring" not in names["decomposers"]  # the installed contrib distribution too
    assert {"tucker2", "cp", "tt", "svd"} <= set(names["decomposers"])
    assert {"energy", "finetune"} <= set(names["rank_selectors"]) | set(names["strategies"])
    assert rankopt.get_registry().failures == []  # the broken plugin is not even imported
    # in-process plugins still work with autoload off
    import rankopt_fixture_good as good  # importable: its folder is on sys.path

    rankopt.register_plugin(good)
    assert "fixture_lowrank" in rankopt.plugin_names()["decomposers"]


@pytest.mark.parametrize("value", ["0", "", "no"])
def test_autoload_stays_on_for_other_values(plugin_env, monkeypatch, value):  # noqa: F811
    plugin_env.activate("good")
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    rankopt.reset_registry()
    assert "fixture_lowrank" in rankopt.plugin_names()["decomposers"]


def test_explicit_autoload_argument_wins_over_the_environment(plugin_env, monkeypatch):  # noqa: F811
    plugin_env.activate("good")
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert "fixture_lowrank" in Registry(autoload=True).names("decomposers")
    monkeypatch.delenv(AUTOLOAD_ENV)
    assert "fixture_lowrank" not in Registry(autoload=False).names("decomposers")


def test_the_same_plugin_module_registered_twice_is_one_plugin():
    import rankopt.plugins.decomposers.svd as svd_module

    rankopt.register_plugin(svd_module)  # already a built-in: pluggy refuses the duplicate object
    try:
        reg = rankopt.get_registry()
        assert rankopt.decomposer("svd").name == "svd"
        assert any("already registered" in f.reason for f in reg.failures)
    finally:
        rankopt.reset_registry()


def test_compress_uses_an_entry_point_decomposer_by_name(plugin_env):  # noqa: F811
    plugin_env.activate("good")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))
    small = rankopt.compress(net, {"0": {"decomposer": "fixture_lowrank", "ranks": [2]}, "2": {"decomposer": "svd", "ranks": [2]}})
    assert isinstance(small[0], nn.Sequential) and small[0][0].out_features == 2
    assert isinstance(net[0], nn.Linear)  # the original is untouched
