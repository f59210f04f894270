"""rankopt.densify and ``rankopt export --keep-faster``: a decomposed layer that runs slower
than the dense one in the serving runtime ships as the dense layer it computes (issue 14)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import rankopt
from rankopt.deploy.artifacts import save_compressed
from rankopt.cli import main
from rankopt.core.errors import ConfigError
from rankopt.plugins.models.small_cnn import small_cnn


class StridedNet(nn.Module):
    """Convs with stride, padding, dilation and bias, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(12, 20, 3, stride=2, padding=2, dilation=2, bias=True)
        self.conv3 = nn.Conv2d(20, 16, (3, 5), padding=(1, 2), bias=False)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))


FORMS = ["tucker2", "cp", "tt", "svd"]
if importlib.util.find_spec("rankopt_tensor_ring") is not None:
    FORMS.append("tensor_ring")


def _pair(decomposer: str) -> tuple[nn.Module, nn.Module, list[str]]:
    torch.manual_seed(0)
    reference = StridedNet().eval()
    dec = rankopt.decomposer(decomposer)
    spec = {}
    for layer in ("conv2", "conv3", "fc"):
        module = reference.get_submodule(layer)
        if not dec.supports(module):
            continue
        spec[layer] = {"decomposer": decomposer, "ranks": [max(1, r // 2) for r in dec.max_ranks(module)]}
    assert spec, decomposer
    return reference, rankopt.compress(reference, spec).eval(), list(spec)


@pytest.mark.parametrize("decomposer", FORMS)
def test_a_densified_layer_computes_what_its_factors_did(decomposer: str) -> None:
    reference, compressed, layers = _pair(decomposer)
    before = {k: v.clone() for k, v in compressed.state_dict().items()}
    dense = rankopt.densify(compressed, reference, layers)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = compressed(x), dense(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
    for layer in layers:
        module, original = dense.get_submodule(layer), reference.get_submodule(layer)
        assert type(module) is type(original)
        assert module.weight.shape == original.weight.shape
        if isinstance(original, nn.Conv2d):
            assert (module.stride, module.padding, module.dilation) == (
                original.stride, original.padding, original.dilation)
    # the model passed in is untouched
    assert all(torch.equal(before[k], v) for k, v in compressed.state_dict().items())
    # the factorized layers had fewer params; the dense ones have the reference's kernels
    assert rankopt.count(dense, (1, 3, 16, 16)).params >= rankopt.count(reference, (1, 3, 16, 16)).params - sum(
        reference.get_submodule(n).bias.numel() for n in layers if reference.get_submodule(n).bias is not None)


def test_densify_refuses_a_layer_that_is_not_decomposed_or_unknown() -> None:
    reference, compressed, _ = _pair("tucker2")
    with pytest.raises(ConfigError, match="layer 'conv1' must be a decomposed Conv2d or Linear.*Conv2d"):
        rankopt.densify(compressed, reference, ["conv1"])
    with pytest.raises(ConfigError, match="no layer 'nope'"):
        rankopt.densify(compressed, reference, ["nope"])


SPEC = {"3": {"decomposer": "tucker2", "ranks": [4, 6]}, "12": {"decomposer": "svd", "ranks": [5]}}
BASE = {"model": "small_cnn", "kwargs": {"width": 8, "num_classes": 10, "in_channels": 1}}


@pytest.fixture
def picked(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    small = rankopt.compress(small_cnn(width=8), SPEC).eval()
    return save_compressed(tmp_path / "model.pt", small, SPEC, base=BASE, input_shape=(1, 1, 8, 8))


def _conv_nodes(path: Path) -> int:
    import onnx

    return sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)


def test_export_keep_faster_ships_the_slower_layers_dense(
    picked: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    pytest.importorskip("onnxruntime", reason="the deploy extra (pip install -e '.[deploy]') is not installed")
    import rankopt.compression.latency as latency

    seen: dict[str, Any] = {}

    def fake(model: nn.Module, spec: Any, layers: Any, **options: Any) -> tuple[dict, dict]:
        # timings are the machine's: say which layer is slower instead of measuring
        seen.update(options, layers=[info.name for info in layers])
        return {"12": spec["12"]}, {"3": "kept full: tucker2 [4, 6] measured 2 ms vs 1 ms"}

    monkeypatch.setattr(latency, "keep_faster_layers", fake)
    plain, faster = tmp_path / "plain.onnx", tmp_path / "faster.onnx"
    assert main(["export", str(picked), "--out", str(plain)]) == 0
    assert main(["export", str(picked), "--out", str(faster), "--keep-faster", "--latency-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "3: kept full: tucker2 [4, 6] measured 2 ms vs 1 ms" in out
    assert "--keep-faster: 1 of 2 decomposed layers made dense again (timed in onnxruntime at batch 4)" in out
    assert seen["runtime"] == "onnxruntime" and seen["batch"] == 4 and "3" in seen["layers"]
    # the Tucker-2 chain of three convs became one conv; export verified it against PyTorch
    assert _conv_nodes(plain) - _conv_nodes(faster) == 2
    ts = tmp_path / "faster.pt"
    assert main(["export", str(picked), "--format", "torchscript", "--out", str(ts), "--keep-faster"]) == 0
    assert seen["runtime"] == "torchscript" and ts.is_file()


def test_export_keep_faster_measures_for_real(picked: Path, tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("onnxruntime", reason="the deploy extra (pip install -e '.[deploy]') is not installed")
    out = tmp_path / "m.onnx"
    assert main(["export", str(picked), "--out", str(out), "--keep-faster"]) == 0
    text = capsys.readouterr().out
    assert "decomposed layers made dense again (timed in onnxruntime at batch 1)" in text and out.is_file()


def test_export_keep_faster_refuses_a_folded_file_and_a_bad_batch(picked: Path, tmp_path: Path,
                                                                  capsys: Any) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", str(picked), "--out", str(out), "--keep-faster", "--latency-batch", "0"]) == 2
    assert "--latency-batch must be a positive integer, got 0" in capsys.readouterr().err
    folded = tmp_path / "folded.pt"
    save_compressed(folded, rankopt.compress(small_cnn(width=8), SPEC).eval(), SPEC, base=BASE,
                    input_shape=(1, 1, 8, 8), metadata={"fold_bn": True})
    assert main(["export", str(folded), "--out", str(out), "--keep-faster"]) == 2
    assert "pick it again without --fold-bn" in capsys.readouterr().err
    assert not out.exists()
