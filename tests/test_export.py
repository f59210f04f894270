"""rankopt.export: every layer form to ONNX and TorchScript, BatchNorm folding, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.core.errors import ConfigError, ExportError
from rankopt.deploy.exporting import export, fold_batchnorm

pytest.importorskip("onnxruntime", reason="the deploy extra (pip install -e '.[deploy]') is not installed")


class ConvBnNet(nn.Module):
    """conv-BN-ReLU twice, a pool and a linear head: each decomposer has a layer to take."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 4), 1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = ConvBnNet()
    with torch.no_grad():  # BatchNorm statistics far from the identity, so folding matters
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def _compressed(decomposer: str) -> nn.Module:
    net = _net()
    dec = rankopt.decomposer(decomposer)
    layer = "fc" if decomposer == "svd" else "conv2"
    largest = dec.max_ranks(net.get_submodule(layer))
    spec = {layer: {"decomposer": decomposer, "ranks": [max(1, r // 2) for r in largest]}}
    return rankopt.compress(net, spec).eval()


def _inputs(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("decomposer", ["tucker2", "cp", "tt", "svd", "tensor_ring"])
def test_every_layer_form_exports_and_matches_pytorch(tmp_path: Path, decomposer: str, fmt: str) -> None:
    model = _compressed(decomposer)
    path = tmp_path / f"m.{fmt}"
    result = export(model, path, fmt, input_shape=(1, 3, 12, 12))
    assert path.is_file() and result.max_abs_diff <= 1e-4
    x = _inputs(5)  # a batch of 5 though exported at batch 1: the batch dimension is dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    else:
        got = torch.jit.load(str(path))(x).detach().numpy()
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("decomposer", "left"), [("tucker2", 0), ("cp", 0), ("tt", 1), ("tensor_ring", 1)])
def test_folded_batchnorm_equals_unfolded(decomposer: str, left: int) -> None:
    model = _compressed(decomposer)
    folded = fold_batchnorm(model)
    # TT ends in a reshape, tensor_ring in a functional conv of computed weights: their BN stays
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == left
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input is left as is
    x = _inputs(8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=0)


def test_above_the_tolerance_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rankopt.deploy.exporting as export_mod

    path = tmp_path / "m.onnx"
    path.write_bytes(b"an earlier file")
    real = export_mod.run_exported
    monkeypatch.setattr(export_mod, "run_exported", lambda *a, **k: real(*a, **k) + 1e-2)
    with pytest.raises(ExportError, match=r"differs from PyTorch by up to 0\.01.*tolerance 0\.0001"):
        export(_compressed("tucker2"), path, "onnx", input_shape=(1, 3, 12, 12))
    assert path.read_bytes() == b"an earlier file"  # not overwritten, no partial file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"format": "tflite", "input_shape": (1, 3, 12, 12)}, r"format must be one of \['onnx', 'torchscript'\], got 'tflite'"),
        ({"format": "onnx", "input_shape": (3, 0)}, r"input_shape must be positive integers.*got \(3, 0\)"),
        ({"format": "onnx", "input_shape": None}, r"input_shape must be positive integers.*got None"),
        ({"format": "onnx", "input_shape": (1, 3, 12, 12), "tolerance": 0.0}, r"tolerance must be a positive number, got 0\.0"),
    ],
)
def test_bad_arguments_fail_before_writing(tmp_path: Path, kwargs: dict, match: str) -> None:
    path = tmp_path / "m.out"
    with pytest.raises(ConfigError, match=match):
        export(_net(), path, **kwargs)
    assert not path.exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_model_exports_and_its_latency_is_measured(tmp_path: Path) -> None:
    from rankopt.compression.latency import measure_model_latency

    model = _compressed("tucker2").cuda()
    result = export(model, tmp_path / "m.onnx", "onnx", input_shape=(1, 3, 12, 12))
    assert result.max_abs_diff <= 1e-4 and next(model.parameters()).is_cuda  # the caller's model stays put
    timed = measure_model_latency(model, _net().cuda(), (1, 3, 12, 12), device="cuda")
    assert timed["latency_ms"] > 0 and timed["latency_ratio"] > 0
