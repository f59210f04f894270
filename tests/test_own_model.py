"""Bring your own model: a ``module:factory`` beside the study file, a plain function, and
the run's models leaving it (export, pick, --fold-bn, evaluate) without PYTHONPATH."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import rankopt
from rankopt.cli import main
from rankopt.config.schema import load_config
from rankopt.core.errors import ArtifactError, ConfigError
from study_support import RANDOM, small_study

MYNET = '''import torch.nn as nn


def factory(width=8, num_classes=10, in_channels=1):  # a plain function: no annotation
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )
'''

STUDY = small_study("mine", model={"name": "mynet:factory", "kwargs": {"width": 8}},
                    data={"name": "digits", "batch_size": 128, "test_fraction": 0.2}, decomposers=["tucker2", "svd"],
                    strategies={"finetune": {"epochs": 1, "lr": 0.02}}, sampler=RANDOM, trials=2)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("project")
    (folder / "mynet.py").write_text(MYNET)
    (folder / "study.yaml").write_text(yaml.safe_dump(STUDY))
    assert not any(str(folder) == p or str(folder.resolve()) == p for p in sys.path)
    return folder


@pytest.fixture(scope="module")
def own_run(project: Path) -> Path:
    out = project.parent / "own-run"
    assert main(["run", str(project / "study.yaml"), "--run-dir", str(out), "--quiet"]) == 0
    return out


def test_a_module_beside_the_study_file_is_found(project: Path) -> None:
    config = load_config(project / "study.yaml")
    assert config.model is not None and config.model.path == str(project.resolve())


def test_a_missing_module_says_where_it_was_looked_for(tmp_path: Path) -> None:
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump({**STUDY, "model": {"name": "nosuchnet_xyz:factory"}}))
    with pytest.raises(ConfigError) as info:
        load_config(study)
    text = str(info.value)
    assert "beside the study file" in text and "PYTHONPATH" in text and "nosuchnet_xyz.py" in text
    assert len(text) < 300


def test_a_plain_function_of_installed_or_standard_code_stays_refused(project: Path) -> None:
    # unannotated functions are trusted only in the user's own code, never the standard
    # library's or an installed package's
    for name in ("os:system", "json:dumps", "torch:load", "yaml:safe_dump"):
        with pytest.raises(ConfigError, match="neither an nn.Module subclass"):
            load_config({**STUDY, "model": {"name": name}})


def test_export_of_a_trial_writes_a_checked_onnx_file(own_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", str(own_run), "--trial", "0", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0
    assert "largest |difference| from PyTorch on" in capsys.readouterr().out


def test_pick_fold_bn_and_export_of_the_picked_file(own_run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxruntime")
    picked = tmp_path / "picked.pt"
    assert main(["pick", str(own_run), "--trial", "0", "--out", str(picked), "--fold-bn"]) == 0
    capsys.readouterr()
    # a file on its own imports nothing unless told: the CLI says exactly what to pass
    assert main(["export", str(picked), "--out", str(tmp_path / "p.onnx")]) == 1
    assert "--allow-module mynet" in capsys.readouterr().err
    assert main(["export", str(picked), "--out", str(tmp_path / "p.onnx"), "--allow-module", "mynet"]) == 0
    model = rankopt.load_compressed(picked, allow_modules=["mynet"])
    assert type(model) is nn.Sequential  # not an fx GraphModule
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_evaluate_the_own_model_run(own_run: Path) -> None:
    assert main(["evaluate", str(own_run)]) == 0


def test_fold_bn_keeps_the_class_and_the_function() -> None:
    from rankopt.deploy.exporting import fold_batchnorm
    from rankopt.plugins.models.small_cnn import small_cnn

    torch.manual_seed(0)
    model = small_cnn(width=8).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    folded = fold_batchnorm(model)
    assert type(folded) is type(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_picked_file_finds_an_allowed_module_beside_it_never_where_it_says(
    own_run: Path, project: Path, tmp_path: Path
) -> None:
    """In fresh processes (no module cached): beside the file it is found; a folder named
    inside the file (anyone may write one) is not followed."""
    import os
    import subprocess

    from rankopt.deploy.artifacts import _checksum

    pytest.importorskip("onnxruntime")
    beside = project / "picked.pt"
    assert main(["pick", str(own_run), "--trial", "0", "--out", str(beside)]) == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}

    def export(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rankopt", "export", str(path), "--out",
                               str(tmp_path / "x.onnx"), "--allow-module", "mynet"], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    assert export(beside).returncode == 0
    payload = torch.load(beside, weights_only=True)
    payload["base"] = {**payload["base"], "path": str(project)}  # a file naming a folder
    payload["sha256"] = _checksum(payload)
    elsewhere = tmp_path / "elsewhere" / "picked.pt"
    elsewhere.parent.mkdir()
    torch.save(payload, elsewhere)
    refused = export(elsewhere)
    assert refused.returncode == 1 and "cannot import module 'mynet'" in refused.stderr, refused.stderr
