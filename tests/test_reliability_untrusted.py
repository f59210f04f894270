"""Issue 12, section 1: a model file never imports or runs code; a study file (trusted like
a script) may import a factory, but only an nn.Module class or a function annotated to
return one is ever called."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankopt
from rankopt.deploy.artifacts import _checksum, save_compressed
from rankopt.cli import main
from rankopt.config.schema import load_config
from rankopt.core.errors import ArtifactError, ConfigError
from rankopt.plugins.models.small_cnn import small_cnn

SPEC = {"3": {"decomposer": "tucker2", "ranks": [4, 6]}, "12": {"decomposer": "svd", "ranks": [5]}}
BASE = {"model": "small_cnn", "kwargs": {"width": 8, "num_classes": 10, "in_channels": 1}}

EVIL_MODULE = """
import pathlib
pathlib.Path({marker!r}).with_suffix(".import").write_text("imported")
import torch.nn as nn
class Net(nn.Module):
    def __init__(self, **kwargs):
        pathlib.Path({marker!r}).with_suffix(".init").write_text("called")
        super().__init__()
"""


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    small = rankopt.compress(small_cnn(width=8), SPEC)
    return save_compressed(tmp_path / "model.pt", small, SPEC, base=BASE, input_shape=(1, 1, 8, 8))


def _forge(model_file: Path, out: Path, base: dict) -> Path:
    payload = torch.load(model_file, weights_only=True)
    payload["base"] = base
    payload["sha256"] = _checksum(payload)  # anyone can recompute the checksum
    torch.save(payload, out)
    return out


def test_a_module_beside_the_file_is_never_imported(model_file: Path, tmp_path: Path) -> None:
    # run from the file's folder as `python -c` does: the current directory is on sys.path
    marker = tmp_path / "marker"
    (tmp_path / "evil_local_mod.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    forged = _forge(model_file, tmp_path / "forged.pt", {"callable": "evil_local_mod:Net", "kwargs": {}})
    code = (
        "import rankopt, sys\n"
        "try:\n    rankopt.load_compressed('forged.pt')\n"
        "except rankopt.ArtifactError as e:\n    print('refused:', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert "refused:" in out.stdout and "never imports a module" in out.stdout, out.stdout + out.stderr
    assert "load_compressed(path, model=MyNet())" in out.stdout
    assert not marker.with_suffix(".import").exists() and not marker.with_suffix(".init").exists()
    assert forged.is_file()


def test_an_installed_module_with_import_side_effects_is_not_imported(
    model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sys.modules.pop("this", None)
    forged = _forge(model_file, tmp_path / "this.pt", {"callable": "this:s", "kwargs": {}})
    with pytest.raises(ArtifactError, match="never imports a module"):
        rankopt.load_compressed(forged)
    assert "this" not in sys.modules
    assert capsys.readouterr().out == ""  # `import this` would print the Zen of Python


def test_a_caller_passed_model_loads_any_file(model_file: Path, tmp_path: Path) -> None:
    forged = _forge(model_file, tmp_path / "f.pt", {"callable": "evil_local_mod:Net", "kwargs": {}})
    model = rankopt.load_compressed(forged, model=small_cnn(width=8))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_kwargs_allocation_bomb_is_refused_before_allocating(model_file: Path, tmp_path: Path) -> None:
    bomb = {"model": "small_cnn", "kwargs": {"width": 10**6, "num_classes": 10, "in_channels": 1}}
    forged = _forge(model_file, tmp_path / "bomb.pt", bomb)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ArtifactError, match=r"does not match its spec: .* gives '.*' the shape"):
        rankopt.load_compressed(forged)  # width 1e6 would need ~10**13 floats
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000
    # a small but wrong width is named the same way, and the intact file still loads
    wrong = {**bomb, "kwargs": {**bomb["kwargs"], "width": 9}}
    with pytest.raises(ArtifactError, match="does not match its spec"):
        rankopt.load_compressed(_forge(model_file, tmp_path / "w.pt", wrong))
    assert rankopt.load_compressed(model_file)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("name", ["os:system", "subprocess:run", "builtins:exec", "torch:load"])
def test_study_files_never_call_a_non_model_factory(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    kwargs = {"command": f"touch {marker}"} if name == "os:system" else {}
    with pytest.raises(ConfigError, match="neither an nn.Module subclass nor a function annotated"):
        load_config({"name": "x", "model": {"name": name, "kwargs": kwargs}, "data": {"name": "digits"}})
    study = tmp_path / "s.yaml"
    study.write_text(f"name: x\nmodel: {{name: '{name}', kwargs: {kwargs!r}}}\ndata: {{name: digits}}\n")
    assert main(["run", str(study), "--run-dir", str(tmp_path / "run")]) == 2
    assert main(["inspect", name]) == 2
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_an_annotated_factory_in_a_study_file_is_still_allowed() -> None:
    config = load_config({"name": "x", "model": {"name": "rankopt.plugins.models.small_cnn:small_cnn"},
                          "data": {"name": "digits"}})
    assert config.model is not None
