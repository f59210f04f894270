"""Safe artifacts and config (issue 7, point 5): model files are plain tensors and data,
loaded with ``weights_only=True``; a file carrying pickled code, a truncated or tampered
file is refused with a clear error and runs nothing; study files run no code except an
explicit ``package.module:callable``; config names cannot write outside the run directory.
"""

from __future__ import annotations

import io
import os
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import rankopt
from rankopt.deploy.artifacts import FORMAT, VERSION, _checksum, read_compressed, save_compressed
from rankopt.config.schema import load_config
from rankopt.core.errors import ArtifactError, ConfigError
from rankopt.plugins.models.small_cnn import small_cnn

SPEC = {"3": {"decomposer": "tucker2", "ranks": [4, 6]}, "12": {"decomposer": "svd", "ranks": [5]}}
BASE = {"model": "small_cnn", "kwargs": {"width": 8, "num_classes": 10, "in_channels": 1}}


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    small = rankopt.compress(small_cnn(width=8), SPEC)
    return save_compressed(tmp_path / "model.pt", small, SPEC, base=BASE, input_shape=(1, 1, 8, 8))


def pickle_globals(path: Path) -> set[str]:
    """Every global (module.name) the pickle inside a torch zip file refers to."""
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
    return found


def test_model_files_hold_only_tensors_and_plain_data(model_file: Path) -> None:
    payload = torch.load(model_file, weights_only=True)  # PyTorch's own safe loader accepts it
    assert payload["format"] == FORMAT and payload["version"] == VERSION
    # the only globals are torch's tensor-rebuilding functions and storage types
    assert pickle_globals(model_file) <= {
        "torch._utils._rebuild_tensor_v2", "torch.FloatStorage", "torch.LongStorage",
        "collections.OrderedDict", "torch._utils._rebuild_parameter",
    }
    model = rankopt.load_compressed(model_file)
    assert torch.equal(model(torch.ones(2, 1, 8, 8)), model(torch.ones(2, 1, 8, 8)))


class Exploit:
    """Pickles to a call of os.system: what a malicious model file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def test_a_file_carrying_pickled_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": VERSION, "base": BASE, "spec": {},
                "state_dict": {}, "metadata": Exploit(marker)}, evil)
    with pytest.raises(ArtifactError, match="cannot be read safely"):
        rankopt.load_compressed(evil)
    assert not marker.exists()


def test_truncated_and_tampered_files_give_clear_errors(model_file: Path, tmp_path: Path) -> None:
    data = model_file.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated, tampered with or not a rankopt model file"):
        rankopt.load_compressed(truncated)

    # overwrite the middle of the file (tensor bytes and zip records alike)
    tampered = tmp_path / "tampered.pt"
    middle = len(data) // 2
    tampered.write_bytes(data[:middle] + b"\xff" * 64 + data[middle + 64:])
    with pytest.raises(ArtifactError):
        rankopt.load_compressed(tampered)

    # a well-formed file whose spec or weights were edited fails its checksum
    payload = torch.load(model_file, weights_only=True)
    payload["spec"]["3"]["ranks"] = [5, 6]
    edited = tmp_path / "edited.pt"
    torch.save(payload, edited)
    with pytest.raises(ArtifactError, match="tampered with or corrupted"):
        rankopt.load_compressed(edited)
    payload = torch.load(model_file, weights_only=True)
    next(iter(payload["state_dict"].values())).view(-1)[0] += 1.0
    torch.save(payload, edited)
    with pytest.raises(ArtifactError, match="tampered with or corrupted"):
        rankopt.load_compressed(edited)
    # without a checksum (an older file) nothing loads unless asked, and then with a
    # warning; a spec that does not fit the weights is still caught
    payload = torch.load(model_file, weights_only=True)
    del payload["sha256"]
    payload["spec"]["3"]["ranks"] = [5, 6]
    torch.save(payload, edited)
    with pytest.raises(ArtifactError, match="carries no sha256 checksum.*allow_unchecked=True"):
        rankopt.load_compressed(edited)
    with pytest.warns(UserWarning, match="no checksum"), \
            pytest.raises(ArtifactError, match="does not match its spec"):
        rankopt.load_compressed(edited, allow_unchecked=True)

    not_ours = tmp_path / "state_dict.pt"
    torch.save(small_cnn(width=8).state_dict(), not_ours)
    with pytest.raises(ArtifactError, match="not a rankopt compressed model"):
        read_compressed(not_ours)


def test_a_model_file_cannot_name_an_arbitrary_callable(model_file: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = torch.load(model_file, weights_only=True)
    for target, kwargs in [("os:system", {"command": f"touch {marker}"}),
                           ("subprocess:run", {"args": ["touch", str(marker)]}),
                           ("torch:load", {"f": str(model_file), "weights_only": False})]:
        payload["base"] = {"callable": target, "kwargs": kwargs}
        payload["sha256"] = _checksum(payload)  # a forger can recompute the checksum
        path = tmp_path / "named.pt"
        torch.save(payload, path)
        with pytest.raises(ArtifactError, match="never imports a module"):
            rankopt.load_compressed(path)
        # even a caller that allows the module gets no call of a non-model callable
        with pytest.raises(ArtifactError, match="neither an nn.Module subclass nor a function annotated"):
            rankopt.load_compressed(path, allow_modules=[target.split(":")[0]])
    assert not marker.exists()
    # an annotated factory is followed only under a module prefix the caller allows
    payload["base"] = {"callable": "rankopt.plugins.models.small_cnn:small_cnn", "kwargs": BASE["kwargs"]}
    payload["sha256"] = _checksum(payload)
    torch.save(payload, tmp_path / "factory.pt")
    with pytest.raises(ArtifactError, match="never imports a module"):
        rankopt.load_compressed(tmp_path / "factory.pt")
    loaded = rankopt.load_compressed(tmp_path / "factory.pt", allow_modules=["rankopt.plugins"])
    assert isinstance(loaded, nn.Module)


# -- study files ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "name: x\nmodel: !!python/object/apply:os.system ['touch {marker}']\n",
    "name: x\nmodel: !!python/name:os.system\n",
    "name: !!python/object/new:subprocess.Popen [['touch', '{marker}']]\n",
])
def test_yaml_tags_never_run_code(tmp_path: Path, text: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "study.yaml"
    path.write_text(text.format(marker=marker))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()


@pytest.mark.parametrize("name, needle", [
    ("os.system('touch x')", "unknown model"),  # not a name: no code is evaluated
    ("__import__('os').system", "unknown model"),
    ("os:system('touch x')", "is not of the form 'package.module:callable'"),
    ("not_an_installed_module:build", "cannot import module 'not_an_installed_module'"),
    ("rankopt.plugins.models.small_cnn:no_such_factory", "has no attribute"),
])
def test_model_code_only_through_an_importable_callable(name: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config({"name": "x", "model": {"name": name}, "data": {"name": "digits"}})


@pytest.mark.parametrize("name", ["../../etc", "/etc/cron.d/x", "..", "a/../../b", "..\\..\\x",
                                  ".hidden", "x\x00y", "", " x", "runs/../../x"])
def test_study_names_cannot_leave_the_run_directory(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        rankopt.Study({"name": name, "model": {"name": "small_cnn"}, "data": {"name": "digits"}})
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=200, deadline=None)
@given(name=st.text(min_size=1, max_size=20))
def test_any_accepted_name_stays_under_runs(name: str) -> None:
    try:
        config = load_config({"name": name, "trials": 1}, check_plugins=False)
    except ConfigError:
        return
    base = Path("/work/somewhere").resolve()
    run_dir = (base / config.resolved_run_dir(base).relative_to(base)).resolve()
    assert run_dir.parent == base / "runs"
    assert yaml.safe_load(yaml.safe_dump({"name": config.name}))["name"] == name
