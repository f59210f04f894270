"""Issue 12, section 3: every value is checked before work starts: exit 2, one line naming
the field, the value and what is allowed, and nothing written."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

import rankopt
from rankopt.cli import main
from rankopt.core.errors import ConfigError
from rankopt.plugins.models.small_cnn import small_cnn

BASE: dict[str, Any] = {
    "name": "up",
    "model": {"name": "small_cnn", "kwargs": {"width": 4}},
    "data": {"name": "digits"},
    "reference": {"epochs": 0.2},
    "strategies": {"finetune": {"epochs": 0.05}},
    "trials": 1,
}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, *needles: str,
            args: tuple[str, ...] = ()) -> str:
    """Run ``text`` as a study file: exit 2, one line holding every needle, nothing written."""
    study = tmp_path / "s.yaml"
    study.write_text(text)
    before = snapshot(tmp_path)
    code = main(["run", str(study), "--run-dir", str(tmp_path / "run"), "-q", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
    return err


def dump(**changes: Any) -> str:
    data = {**BASE}
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return yaml.safe_dump(data)


@pytest.mark.parametrize("changes, needles", [
    ({"resources": {"cpus": float("inf")}}, ("resources.cpus", "inf")),
    ({"resources": {"cpus": 1e9}}, ("resources.cpus", "1000000000", "1024")),
    ({"seed_proposals": 10**9}, ("seed_proposals", "1000000000", "1000")),
    ({"screening": {"candidates": 10**9}}, ("screening.candidates", "1000000000")),
    ({"reference": {"epochs": float("inf")}}, ("reference.epochs", "inf")),
    ({"reference": {"lr": float("nan")}}, ("reference.lr", "nan")),
    ({"train": {"grad_clip": float("nan")}}, ("train.grad_clip", "nan", "finite")),
    ({"strategies": {"finetune": {"epochs": float("inf")}}}, ("strategies.finetune.epochs", "inf", "finite")),
    ({"trials": True}, ("trials", "True", "integer")),
    ({"name": "x" * 150}, ("name", "150 characters", "at most")),
    ({"name": "a b"}, ("name", "'a b'", "letters")),
    ({"name": "x\n"}, ("name", "'x\\n'",)),
    ({"model": {"name": "small_cnn", "kwargs": {"width": 4, "num_classes": 3}}}, ("model.name", "3]", "10 classes")),
    ({"model": {"name": "small_cnn", "kwargs": {"width": 4, "in_channels": 3}}}, ("model.name", "in_channels")),
])
def test_bad_values_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], needles: tuple[str, ...]
) -> None:
    refused(tmp_path, capsys, dump(**changes), *needles)


def test_reference_weights_must_be_a_state_dict_of_this_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    pickled = tmp_path / "pickle.pt"
    torch.save({"weights": Path("x")}, pickled)  # a pickled object beyond tensors
    whole = tmp_path / "whole.pt"
    torch.save(small_cnn(width=4), whole)
    wrong = tmp_path / "wrong.pt"
    torch.save(small_cnn(width=6).state_dict(), wrong)
    cases = [(garbage, "not a state_dict file"), (pickled, "not a state_dict file"),
             (whole, "not a state_dict file"), (wrong, "'0.weight' has shape [6, 1, 3, 3], the model's is [4, 1, 3, 3]")]
    for path, needle in cases:
        text = dump(reference={"weights": str(path), "epochs": 0})
        refused(tmp_path, capsys, text.replace("epochs: 0.2\n", ""), "reference.weights", needle)


def test_python_api_input_shape_is_checked_with_one_forward_pass(tmp_path: Path) -> None:
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    splits = rankopt.DatasetSplits(TensorDataset(x, y), TensorDataset(x, y), 10, (3, 8, 8))
    with pytest.raises(ConfigError, match=r"input_shape \[3, 8, 8\] does not match the data's samples"):
        rankopt.Study({**BASE, "run_dir": str(tmp_path / "run")}, data=splits).run()
    labels = rankopt.DatasetSplits(TensorDataset(x, y + 5), TensorDataset(x, y), 10, (1, 8, 8))
    with pytest.raises(ConfigError, match="outside the 10 classes"):
        rankopt.Study({**BASE, "run_dir": str(tmp_path / "run")}, data=labels).run()
    assert not (tmp_path / "run").exists()


def test_yaml_duplicate_keys_and_alias_bombs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(tmp_path, capsys, dump() + "trials: 5\n", "duplicate key 'trials'")
    nested = "name: up\nmodel: {name: small_cnn, name: vgg11_bn}\ndata: {name: digits}\n"
    refused(tmp_path, capsys, nested, "duplicate key 'name'")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
    start = time.process_time()
    err = refused(tmp_path, capsys, "name: bomb\n" + bomb, "aliases", "at most")
    assert time.process_time() - start < 5 and len(err) < 500


def test_a_run_dir_on_a_read_only_file_system(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # as root, os.access says yes to a read-only mount's folders; the mount's flag does not
    real = os.statvfs

    class ReadOnly:
        def __init__(self, st: Any) -> None:
            self.st = st
            self.f_flag = st.f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real(p)))
    refused(tmp_path, capsys, dump(), "read-only file system")


def test_pick_out_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    study = tmp_path / "s.yaml"
    study.write_text(dump())
    assert main(["run", str(study), "--run-dir", str(run_dir), "-q"]) == 0
    source = next(run_dir.glob("trials/*/model.pt"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    before = snapshot(tmp_path)
    for out, needle in [(str(tmp_path), "is a directory"), ("", "not a file name"),
                        (str(source), "the trial's own model file"),
                        (str(afile / "model.pt"), "cannot be written")]:
        assert main(["pick", str(run_dir), "--trial", source.parent.name, "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--out" in err and needle in err, err
    assert snapshot(tmp_path) == before
    assert main(["pick", str(run_dir), "--trial", source.parent.name, "--out", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").read_bytes() == source.read_bytes()
