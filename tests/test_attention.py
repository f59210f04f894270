"""Attention projections as compressible layers (rankopt.compression.attention), the post-surgery
forward check, and the layer census."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2
from torchvision.models.vision_transformer import VisionTransformer

import rankopt
from rankopt.compression.attention import ModularMultiheadAttention, modularize_attention
from rankopt.core.errors import UnsupportedModuleError
from rankopt.plugins.decomposers.svd import SVDLinear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / a.detach().norm())


def _spec(net: nn.Module, layers: list[rankopt.LayerInfo], fraction: float) -> dict[str, dict[str, object]]:
    """svd on Linear, tucker2 on dense Conv2d, every rank at ``fraction`` of its largest."""
    from rankopt.compression.surgery import get_submodule

    out: dict[str, dict[str, object]] = {}
    for la in layers:
        if la.groups != 1:
            continue
        dec = "svd" if la.kind == "linear" else "tucker2"
        largest = rankopt.decomposer(dec).max_ranks(get_submodule(net, la.name))
        out[la.name] = {"decomposer": dec, "ranks": [max(1, int(r * fraction)) for r in largest]}
    return out


def small_vit(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    net = VisionTransformer(image_size=32, patch_size=8, num_layers=layers, num_heads=4, hidden_dim=32,
                            mlp_dim=64, num_classes=10).eval()
    nn.init.normal_(net.heads.head.weight, std=0.05)  # torchvision zero-initializes the head
    return net


# -- nn.MultiheadAttention ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"batch_first": True}, {"batch_first": False}, {"batch_first": True, "kdim": 5, "vdim": 7}, {"bias": False},
])
def test_modular_mha_matches_multihead_attention(kwargs: dict[str, object]) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, **kwargs).eval()  # type: ignore[arg-type]
    mod = ModularMultiheadAttention.from_module(copy.deepcopy(mha)).eval()
    q = torch.randn(6, 6, 16)
    k = torch.randn(6, 6, int(kwargs.get("kdim", 16)))  # type: ignore[call-overload]
    v = torch.randn(6, 6, int(kwargs.get("vdim", 16)))  # type: ignore[call-overload]
    if "kdim" not in kwargs:
        k = v = q
    pad = torch.zeros(6, 6, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    for call in ({"need_weights": False}, {"need_weights": True},
                 {"need_weights": True, "average_attn_weights": False, "key_padding_mask": pad},
                 {"need_weights": False, "attn_mask": causal, "key_padding_mask": pad}):
        want, want_w = mha(q, k, v, **call)
        got, got_w = mod(q, k, v, **call)
        assert torch.allclose(got, want, atol=1e-6), call
        assert (got_w is None) == (want_w is None)
        if want_w is not None:
            assert torch.allclose(got_w, want_w, atol=1e-6)
    # the same state_dict keys and values: a reference's weights load either way
    assert mha.state_dict().keys() == mod.state_dict().keys()
    assert all(torch.equal(mha.state_dict()[key], t) for key, t in mod.state_dict().items())
    mod.load_state_dict(mha.state_dict())


def test_vit_lists_attention_projections_and_compresses_them() -> None:
    net = small_vit()
    layers = rankopt.find_layers(net, (1, 3, 32, 32))
    names = [la.name for la in layers]
    # per encoder layer: in_proj, out_proj, mlp.0, mlp.3; then the head; and conv_proj
    assert sum(la.kind == "linear" for la in layers) == 2 * 4 + 1
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj" in names
    assert "encoder.layers.encoder_layer_1.self_attention.out_proj" in names
    census = rankopt.layer_census(net, (1, 3, 32, 32))
    assert len(census.compressible) == 10 and not census.refused and not census.skipped
    x = torch.randn(3, 3, 32, 32)
    full = rankopt.compress(net, _spec(net, layers, 1.0))
    with torch.no_grad():
        assert _rel(net(x), full(x)) < 1e-5
    attn = full.encoder.layers.encoder_layer_0.self_attention
    assert isinstance(attn, ModularMultiheadAttention) and isinstance(attn.in_proj, SVDLinear)
    assert isinstance(attn.out_proj, SVDLinear) and not hasattr(attn.in_proj, "weight")  # no dense weight
    half = rankopt.compress(net, _spec(net, layers, 0.5))
    with torch.no_grad():
        out = half(x)
    assert out.shape == (3, 10) and 1e-3 < _rel(net(x), out)
    assert sum(p.numel() for p in half.parameters()) < sum(p.numel() for p in net.parameters())


def test_out_proj_alone_no_longer_breaks_the_model() -> None:
    # main 1ecccb2: compress returned, then forward raised "'SVDLinear' has no attribute 'weight'"
    net = small_vit()
    name = "encoder.layers.encoder_layer_0.self_attention.out_proj"
    small = rankopt.compress(net, {name: {"decomposer": "svd", "ranks": [4]}}, input_shape=(1, 3, 32, 32))
    with torch.no_grad():
        assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert net.encoder.layers.encoder_layer_0.self_attention.__class__ is nn.MultiheadAttention  # untouched


class CrossAttention(nn.Module):
    """Separate q/k/v projections (kdim, vdim != embed_dim), sequence-first."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=12, vdim=10)
        self.memory = nn.Parameter(torch.randn(5, 1, 12))
        self.values = nn.Parameter(torch.randn(5, 1, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, 16)
        q = x.transpose(0, 1)
        n = q.shape[1]
        out, _ = self.attn(q, self.memory.expand(-1, n, -1), self.values.expand(-1, n, -1))
        return out.transpose(0, 1)


def test_separate_projection_mha_is_compressible() -> None:
    torch.manual_seed(0)
    net = CrossAttention().eval()
    layers = rankopt.find_layers(net, (2, 4, 16))
    assert [la.name for la in layers] == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    assert [(la.in_channels, la.out_channels) for la in layers] == [(16, 16), (12, 16), (10, 16), (16, 16)]
    x = torch.randn(2, 4, 16)
    full = rankopt.compress(net, _spec(net, layers, 1.0))
    with torch.no_grad():
        assert _rel(net(x), full(x)) < 1e-5
        assert rankopt.compress(net, _spec(net, layers, 0.5))(x).shape == x.shape


# -- torchvision Swin window attention -----------------------------------------------------------

@pytest.mark.parametrize("version", [1, 2])
def test_swin_window_attention_projections_are_compressible(version: int) -> None:
    torch.manual_seed(0)
    extra = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if version == 2 else {}
    net = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=[2, 2],
                          num_classes=10, **extra).eval()  # type: ignore[arg-type]
    before = len([m for m in net.modules() if isinstance(m, nn.Linear)])
    layers = rankopt.find_layers(net, (1, 3, 32, 32))
    names = {la.name for la in layers}
    assert {"features.1.0.attn.qkv", "features.1.0.attn.proj", "features.3.0.attn.qkv"} <= names
    assert sum(la.kind == "linear" for la in layers) == before  # every Linear, qkv/proj included
    x = torch.randn(2, 3, 32, 32)
    full = rankopt.compress(net, _spec(net, layers, 1.0))
    with torch.no_grad():
        assert _rel(net(x), full(x)) < 1e-5
        assert rankopt.compress(net, _spec(net, layers, 0.5))(x).shape == (2, 10)
    assert isinstance(full.features[1][0].attn.qkv, SVDLinear)


def test_modularize_keeps_state_dict_and_outputs() -> None:
    net = small_vit()
    clone = copy.deepcopy(net)
    assert modularize_attention(clone) == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert list(clone.state_dict()) == list(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(clone(x), net(x), atol=1e-6)
    assert modularize_attention(clone) == []  # idempotent


# -- parents that read a child's weight ----------------------------------------------------------

class ReadsWeightInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.linear(x, self.fc.weight, self.fc.bias))


def _linear_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


class ReadsWeightInHelper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc(x)  # called, so find_layers lists it, but its result is thrown away
        return self.out(_linear_of(self.fc, x))


class SkipsWhenNoWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self.fc, "weight", None)
        return self.out(self.fc(x) if w is not None else x)


def test_parent_reading_weight_in_its_forward_is_refused() -> None:
    spec = {"fc": {"decomposer": "svd", "ranks": [4]}}
    with pytest.raises(UnsupportedModuleError, match=r"layer 'fc'.*fails in ReadsWeightInForward.*reads the layer's weights"):
        rankopt.compress(ReadsWeightInForward(), spec, input_shape=(1, 8))
    # with no forward pass to run, the parent's source is read before anything is built
    with pytest.raises(UnsupportedModuleError, match=r"layer 'fc'.*ReadsWeightInForward reads self\.fc\.weight"):
        rankopt.compress(ReadsWeightInForward(), spec, check=False)


def test_nn_transformer_encoder_layers_compress_and_train() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    net = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).eval()
    layers = rankopt.find_layers(net, (2, 5, 16))
    assert [la.name for la in layers][:4] == ["0.layers.0.self_attn.in_proj", "0.layers.0.self_attn.out_proj",
                                              "0.layers.0.linear1", "0.layers.0.linear2"]
    x = torch.randn(3, 5, 16)
    full = rankopt.compress(net, _spec(net, layers, 1.0), input_shape=(2, 5, 16))
    with torch.no_grad():  # the original takes PyTorch's fused fast path, the rewritten one does not
        assert _rel(net(x), full(x)) < 1e-5
    half = rankopt.compress(net, _spec(net, layers, 0.5), input_shape=(2, 5, 16)).train()
    half(x).sum().backward()
    assert half[0].layers[0].self_attn.in_proj.linear_in.weight.grad is not None


def test_parent_reading_weight_elsewhere_fails_the_forward_check_naming_the_layer() -> None:
    with pytest.raises(UnsupportedModuleError, match=r"layer 'fc' cannot be compressed.*reads the layer's weights"):
        rankopt.compress(ReadsWeightInHelper(), {"fc": {"decomposer": "svd", "ranks": [4]}}, input_shape=(1, 8))
    # without an input shape, the first usual shape that the model accepts is used
    with pytest.raises(UnsupportedModuleError, match=r"layer 'fc'"):
        rankopt.compress(ReadsWeightInHelper(), {"fc": {"decomposer": "svd", "ranks": [4]}})
    # the other layer is fine
    ok = rankopt.compress(ReadsWeightInHelper(), {"out": {"decomposer": "svd", "ranks": [2]}})
    assert ok(torch.randn(1, 8)).shape == (1, 4)


def test_a_parent_that_silently_skips_the_factorized_layer_is_refused() -> None:
    with pytest.raises(UnsupportedModuleError, match=r"layer 'fc'.*runs without calling it"):
        rankopt.compress(SkipsWhenNoWeight(), {"fc": {"decomposer": "svd", "ranks": [4]}}, input_shape=(1, 8))


def test_tied_weights_are_refused() -> None:
    net = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    net[2].weight = net[0].weight
    with pytest.raises(UnsupportedModuleError, match=r"layer '0'.*shared with '2'"):
        rankopt.compress(net, {"0": {"decomposer": "svd", "ranks": [3]}}, input_shape=(1, 6))
    census = rankopt.layer_census(net, (1, 6))
    assert census.compressible == () and set(census.refused) == {"0", "2"}


# -- the census -----------------------------------------------------------------------------------

class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.seq = nn.Conv1d(16, 16, 1)
        self.aux = nn.Linear(16, 10)  # training only
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        x = self.seq(x.flatten(2)).mean(-1)
        return self.fc(x) + (self.aux(x) if self.training else 0)


def test_census_counts_compressible_refused_and_skipped_with_reasons() -> None:
    census = rankopt.layer_census(Mixed(), (1, 3, 8, 8))
    assert census.compressible == ("stem", "pw", "fc")
    assert census.refused == {"dw": "grouped/depthwise convolution (groups > 1)"}
    assert set(census.skipped) == {"seq", "aux"}
    assert "no decomposer" in census.skipped["seq"] and "never called" in census.skipped["aux"]
    assert census.summary().startswith("3 compressible, 1 refused (grouped/depthwise convolution (groups > 1) x1), 2 skipped")
    only_tucker = rankopt.layer_census(Mixed(), (1, 3, 8, 8), decomposers=["tucker2"])
    assert only_tucker.compressible == ("stem", "pw") and "Linear is not supported" in only_tucker.refused["fc"]


def test_study_default_decomposers_cover_conv_and_linear() -> None:
    from rankopt.config.schema import StudyConfig

    assert StudyConfig(name="x").decomposers == ["tucker2", "svd"]


def test_compressed_attention_models_pickle() -> None:
    import pickle

    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[2, 2],
                           num_classes=10).eval()
    for net, shape in ((small_vit(), (1, 3, 32, 32)), (swin, (1, 3, 32, 32))):
        small = rankopt.compress(net, _spec(net, rankopt.find_layers(net, shape), 0.5))
        again = pickle.loads(pickle.dumps(small))
        x = torch.randn(2, *shape[1:])
        with torch.no_grad():
            assert torch.equal(again(x), small(x))


def test_a_pickled_swin_loads_in_a_process_that_never_imported_torchvision(tmp_path: Path) -> None:
    """The Swin subclasses are made on first use (torchvision costs a second of every
    command's start), and pickle's lookup of them makes them too."""
    import pickle
    import subprocess
    import sys

    torch.manual_seed(0)
    swin = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[2, 2],
                           num_classes=10).eval()
    small = rankopt.compress(swin, _spec(swin, rankopt.find_layers(swin, (1, 3, 32, 32)), 0.5))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.save({"x": x, "y": small(x)}, tmp_path / "io.pt")
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(small))
    script = (
        "import pickle, sys, torch, rankopt, rankopt.cli\n"
        "assert 'torchvision' not in sys.modules, 'importing rankopt loaded torchvision'\n"
        f"net = pickle.loads(open({str(tmp_path / 'model.pkl')!r}, 'rb').read())\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    d = float((net(io['x']) - io['y']).abs().max()); assert d < 1e-5, d\n"
        "print(type(net.features[1][0].attn).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ModularShiftedWindowAttention"


# -- in a study ------------------------------------------------------------------------------------

class TinyTransformer(nn.Module):
    """Patches of a 1x6x6 image -> one attention block -> a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, 16, 2, stride=2)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        t = t + self.mlp(t)
        return self.head(t.mean(1))


def test_a_study_searches_and_compresses_attention_projections_by_default(tmp_path: Path) -> None:
    from rankopt import DatasetSplits
    from rankopt.study import Study

    from study_support import blobs

    torch.manual_seed(0)
    splits = DatasetSplits(train=blobs(96, 0), val=blobs(48, 1), num_classes=2, input_shape=(1, 6, 6))
    study = {"name": "attn", "reference": {"epochs": 1, "lr": 0.05},  # no decomposers: the default
             "selectors": {"fixed": {"fraction": {"low": 0.3, "high": 0.6}}},
             "strategies": {"finetune": {"epochs": 0}}, "sampler": {"name": "random", "seed": 0},
             "trials": 2, "run_dir": str(tmp_path / "run"), "targets": {"dense_input_channels": 0}}
    result = Study(study, model=TinyTransformer(), data=splits).run()
    best = result.front()[0]
    model = result.load_model(best.trial, model=TinyTransformer())
    attn = model.attn
    assert isinstance(attn, ModularMultiheadAttention)
    assert isinstance(attn.in_proj, SVDLinear) and isinstance(attn.out_proj, SVDLinear)
    assert rankopt.count(model, (1, 1, 6, 6)).params == best.params
    with torch.no_grad():
        assert model(torch.randn(3, 1, 6, 6)).shape == (3, 2)


def test_densify_a_factorized_attention_projection() -> None:
    from rankopt.deploy.exporting import densify

    net = small_vit()
    name = "encoder.layers.encoder_layer_0.self_attention.in_proj"
    small = rankopt.compress(net, {name: {"decomposer": "svd", "ranks": [8]}}, input_shape=(1, 3, 32, 32))
    dense = densify(small, net, [name])
    assert type(dense.get_submodule(name)) is nn.Linear
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dense(x), small(x), atol=1e-5)
