"""Broken third-party plugins are reported with their distribution, version and reason,
and never take the rest of rankopt down with them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from fixtures.plugin_env import plugin_env  # noqa: F401  (pytest fixture)

import rankopt
from rankopt.cli import main
from rankopt.contract.manager import PluginFailure

BROKEN = ("broken_import", "raising_hook", "invalid_record", "bad_signature")



def failures_of(distribution: str) -> list[PluginFailure]:
    return [f for f in rankopt.get_registry().failures if f.distribution == distribution]


def test_a_plugin_that_fails_to_import_is_reported_and_the_others_work(plugin_env):  # noqa: F811
    plugin_env.activate("broken_import", "good")
    (failure,) = failures_of("rankopt-fixture-broken")
    assert (failure.plugin, failure.version, failure.stage) == ("rankopt-fixture-broken:broken", "1.2.0", "import")
    assert failure.reason == "ModuleNotFoundError: No module named 'rankopt_fixture_missing_dependency'"
    assert str(failure) == (
        "plugin 'rankopt-fixture-broken:broken' from rankopt-fixture-broken 1.2.0 failed at import: "
        "ModuleNotFoundError: No module named 'rankopt_fixture_missing_dependency'"
    )
    assert rankopt.decomposer("fixture_lowrank").name == "fixture_lowrank"
    assert rankopt.decomposer("tucker2").name == "tucker2"


def test_a_hook_that_raises_is_reported_and_the_plugins_other_hooks_still_count(plugin_env):  # noqa: F811
    plugin_env.activate("raising_hook")
    (failure,) = failures_of("rankopt-fixture-raising")
    assert (failure.version, failure.stage) == ("0.1.0", "hook")
    assert failure.reason == "rankopt_decomposers() raised RuntimeError: license server unreachable"
    assert "fixture_one" in rankopt.plugin_names()["rank_selectors"]  # its selector hook worked
    assert rankopt.plugin_names()["decomposers"]  # and every other plugin's decomposers are there


def test_invalid_records_and_misspelled_hooks_are_reported_one_by_one(plugin_env):  # noqa: F811
    plugin_env.activate("invalid_record")
    found = failures_of("rankopt-fixture-invalid")
    assert all(f.version == "0.2.0" for f in found)
    assert sorted(f.stage for f in found) == ["hook", "hook", "record", "record", "record"]
    text = "\n".join(f.reason for f in found)
    assert "rankopt_rank_selectors() returned a dict ({'name': 'dict_selector'}), not a RankSelectorInfo" in text
    assert "rankopt_rank_selectors() returned a DecomposerInfo (" in text
    assert "rankopt_strategies() must return a list of StrategyInfo, got str" in text
    assert "rankopt_models() raised PluginError: ModelInfo.name must be a lower-case identifier" in text
    assert "got 'Bad Name'" in text
    assert "implements rankopt_strategy(), which is not a rankopt hook (a typo?)" in text
    names = rankopt.plugin_names()
    assert "dict_selector" not in names["rank_selectors"] and "wrong_family" not in names["rank_selectors"]
    assert "finetune" in names["strategies"]


def test_a_hook_with_a_wrong_signature_is_refused_at_registration(plugin_env):  # noqa: F811
    plugin_env.activate("bad_signature")
    (failure,) = failures_of("rankopt-fixture-badsig")
    assert (failure.version, failure.stage) == ("0.4.0", "import")
    assert "PluginValidationError" in failure.reason and "device" in failure.reason


def test_rankopt_plugins_reports_every_failure_with_distribution_and_version(plugin_env, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COLUMNS", "250")
    plugin_env.activate(*BROKEN, "good")
    capsys.readouterr()
    assert main(["plugins", "--format", "json"]) == 0  # listing is not a failure
    out = json.loads(capsys.readouterr().out)
    by_dist = {}
    for f in out["failures"]:
        by_dist.setdefault((f["distribution"], f["version"]), []).append(f["stage"])
    assert {k: sorted(v) for k, v in by_dist.items()} == {
        ("rankopt-fixture-broken", "1.2.0"): ["import"],
        ("rankopt-fixture-raising", "0.1.0"): ["hook"],
        ("rankopt-fixture-invalid", "0.2.0"): ["hook", "hook", "record", "record", "record"],
        ("rankopt-fixture-badsig", "0.4.0"): ["import"],
    }
    assert any(r["name"] == "fixture_lowrank" for r in out["plugins"])
    main(["plugins"])
    text = capsys.readouterr().out
    assert "failed: plugin 'rankopt-fixture-broken:broken' from rankopt-fixture-broken 1.2.0 failed at import" in text


def test_plugins_check_fails_on_a_plugin_that_did_not_load(plugin_env, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("COLUMNS", "250")
    plugin_env.activate("broken_import", "good")
    capsys.readouterr()
    code = main(["plugins", "--check", "--family", "rank_selectors", "--format", "json"])
    rows = json.loads(capsys.readouterr().out)["checks"]
    assert code == 1
    (load,) = [r for r in rows if r["check"].startswith("load")]
    assert (load["name"], load["distribution"], load["passed"]) == (
        "rankopt-fixture-broken:broken", "rankopt-fixture-broken 1.2.0", False,
    )
    half = [r for r in rows if r["name"] == "fixture_half"]
    assert half and all(r["passed"] for r in half), half  # the good plugin passes its checks


def test_everything_broken_at_once_and_a_study_still_completes(plugin_env, tmp_path: Path):  # noqa: F811
    """All four broken distributions installed; a study made of the good plugin's parts runs."""
    plugin_env.activate(*BROKEN, "good")
    reg = rankopt.get_registry()
    assert {f.distribution for f in reg.failures} == {
        "rankopt-fixture-broken", "rankopt-fixture-raising", "rankopt-fixture-invalid", "rankopt-fixture-badsig",
    }
    # lookups and compress with built-ins
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
    small = rankopt.compress(net, {"2": {"decomposer": "tucker2", "ranks": [2, 2]}})
    assert rankopt.count(small, (1, 3, 8, 8)).params < rankopt.count(net, (1, 3, 8, 8)).params
    # a whole study from third-party parts
    result = rankopt.run_study(
        {
            "name": "robust",
            "model": {"name": "fixture_mlp"},
            "data": {"name": "fixture_blobs", "kwargs": {"n": 48}, "batch_size": 16},
            "reference": {"epochs": 1, "lr": 0.05},
            "decomposers": ["fixture_lowrank"],
            "selectors": {"fixture_half": {}},
            "strategies": {"fixture_compress_only": {}},
            "sampler": {"name": "random", "seed": 0},
            "trials": 2,
            "device": "cpu",
            "run_dir": str(tmp_path / "robust"),
        },
        progress=False,
    )
    front = result.front()
    assert front, "the study finished without a completed trial"
    reference = rankopt.count(rankopt.model("fixture_mlp"), (1, 1, 4, 4)).params
    # fixture_half halves both Linear layers' ranks: 16-12 -> r=6, 12-3 -> r=2
    expected = reference - (16 * 12 + 12 * 3) + (6 * (16 + 12) + 2 * (12 + 3))
    assert {(t.strategy, t.selector, t.params) for t in front} == {("fixture_compress_only", "fixture_half", expected)}
