"""Issue 26, item 2: model files are read on the meta device first. A forged file that
declares gigabytes is refused before anything is allocated or hashed (checked under a
memory limit), deep or odd contents give one-line errors, a file without a checksum
loads only when asked, complex or integer tensors never load into float parameters,
and loading never reaches the network."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

import rankopt
from rankopt.deploy.artifacts import _checksum, offline_kwargs, read_compressed, save_compressed
from rankopt.cli import main
from rankopt.core.errors import ArtifactError
from rankopt.plugins.models.small_cnn import small_cnn

SPEC = {"3": {"decomposer": "tucker2", "ranks": [4, 6]}, "12": {"decomposer": "svd", "ranks": [5]}}
BASE = {"model": "small_cnn", "kwargs": {"width": 8, "num_classes": 10, "in_channels": 1}}
GiB = 1 << 30


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    small = rankopt.compress(small_cnn(width=8), SPEC)
    return save_compressed(tmp_path / "model.pt", small, SPEC, base=BASE, input_shape=(1, 1, 8, 8))


def _payload(model_file: Path) -> dict[str, Any]:
    return torch.load(model_file, weights_only=True)


def _save(payload: dict[str, Any], path: Path, *, checksum: bool = True) -> Path:
    if checksum:
        payload["sha256"] = _checksum(payload)  # anyone can recompute it: the sizes must hold anyway
    torch.save(payload, path)
    return path


def forged_broadcast(model_file: Path, out: Path, nbytes: int) -> Path:
    """A file of a few KB whose first tensor is one stored float expanded to ``nbytes``
    (a zero stride); its checksum left as written (computing it would allocate)."""
    payload = _payload(model_file)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = torch.zeros(1).expand(nbytes // 4)
    return _save(payload, out, checksum=False)


def forged_storage(model_file: Path, out: Path, nbytes: int) -> Path:
    """A file whose first tensor declares a storage of ``nbytes`` that the file does not hold."""
    payload = _payload(model_file)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key] = torch.empty(nbytes // 4, device="meta")
    return _save(payload, out, checksum=False)


LIMITED = """
import resource, sys
import rankopt  # imported before the limit: the limit is on what loading adds
from rankopt.cli import main
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
limit = status("VmSize") + (1 << 30)  # everything loading adds must fit in 1 GiB of address space
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one
code = main(sys.argv[1:])
print("EXIT", code, "ADDED", status("VmHWM") - before)
"""


def run_limited(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", LIMITED, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("forge, nbytes, needle", [
    (forged_broadcast, 2 * GiB, "zero stride"),
    (forged_broadcast, 64 * GiB, "zero stride"),
    (forged_storage, 2 * GiB, "of storage, but the file's records hold"),
    (forged_storage, 64 * GiB, "of storage, but the file's records hold"),
])
def test_a_forged_size_is_refused_under_a_1_gib_memory_limit(
    model_file: Path, tmp_path: Path, forge: Any, nbytes: int, needle: str
) -> None:
    forged = forge(model_file, tmp_path / "forged.pt", nbytes)
    assert forged.stat().st_size < 64_000
    out = run_limited(tmp_path, "export", "forged.pt", "--out", "forged.onnx")
    assert "EXIT 1" in out.stdout, out.stdout + out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    added = int(out.stdout.split("ADDED")[1])  # importing torch and rankopt alone takes ~0.8 GB
    assert added < 128 << 20, f"loading added {added:,} bytes of resident memory at its peak"
    assert not (tmp_path / "forged.onnx").exists()
    with pytest.raises(ArtifactError, match=needle):
        rankopt.load_compressed(forged)


def test_a_zip_record_claiming_more_than_the_file_is_refused(model_file: Path, tmp_path: Path) -> None:
    data = bytearray(model_file.read_bytes())
    with zipfile.ZipFile(model_file) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    # the central directory entry of that record: sizes at offsets 20 (compressed), 24 (plain)
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46:at + 46 + name_len]).decode() == info.filename:
            struct.pack_into("<II", data, at + 20, 2 * GiB, 2 * GiB)
            break
        at = data.find(b"PK\x01\x02", at + 4)
    assert at >= 0
    forged = tmp_path / "record.pt"
    forged.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="past the end of the"):
        rankopt.load_compressed(forged)


def test_overlapping_tensors_are_refused(model_file: Path, tmp_path: Path) -> None:
    payload = _payload(model_file)
    key = "12.linear_in.weight"
    rows, cols = payload["state_dict"][key].shape
    base = torch.zeros(rows + cols)
    payload["state_dict"][key] = base.as_strided((rows, cols), (1, 1))  # rows overlap
    with pytest.raises(ArtifactError, match="overlapping strides"):
        read_compressed(_save(payload, tmp_path / "overlap.pt", checksum=False))


def test_deep_or_odd_contents_give_one_line_errors(model_file: Path, tmp_path: Path) -> None:
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    payload = _payload(model_file)
    payload["metadata"] = {"notes": deep}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(30_000)  # the forger's pickler recurses; loading must not
    try:
        path = _save(payload, tmp_path / "deep.pt", checksum=False)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(ArtifactError, match="nest deeper than 32 levels") as info:
        rankopt.load_compressed(path)
    assert "\n" not in str(info.value)
    code = main(["export", str(path), "--out", str(tmp_path / "deep.onnx")])
    assert code == 1

    payload = _payload(model_file)
    payload["state_dict"] = list(payload["state_dict"].values())
    with pytest.raises(ArtifactError, match="state_dict must be a mapping, got list"):
        rankopt.load_compressed(_save(payload, tmp_path / "list.pt"))

    payload = _payload(model_file)
    shared: Any = ["x"] * 100
    for _ in range(5):  # pickle's memo shares each level: 100**5 values from a tiny file
        shared = [shared] * 100
    payload["metadata"] = {"laughs": shared}
    with pytest.raises(ArtifactError, match="more than 1,000,000 values"):
        rankopt.load_compressed(_save(payload, tmp_path / "laughs.pt", checksum=False))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.int32])
def test_complex_or_integer_tensors_never_load_into_float_parameters(
    model_file: Path, tmp_path: Path, dtype: torch.dtype
) -> None:
    payload = _payload(model_file)
    key = "12.linear_in.weight"
    payload["state_dict"][key] = (payload["state_dict"][key] * 100).to(dtype)
    path = _save(payload, tmp_path / "kind.pt")
    needle = "is complex" if dtype.is_complex else f"tensor '12.linear_in.weight' is {dtype}"
    with pytest.raises(ArtifactError, match=needle):
        rankopt.load_compressed(path)
    with pytest.raises(ArtifactError, match=needle):  # also into a module the caller passes
        rankopt.load_compressed(path, model=small_cnn(width=8))


def test_a_file_without_checksum_loads_only_when_asked(model_file: Path, tmp_path: Path) -> None:
    payload = _payload(model_file)
    del payload["sha256"]
    path = _save(payload, tmp_path / "old.pt", checksum=False)
    with pytest.raises(ArtifactError, match="carries no sha256 checksum"):
        rankopt.load_compressed(path)
    with pytest.warns(UserWarning, match="no checksum"):
        model = rankopt.load_compressed(path, allow_unchecked=True)
    x = torch.ones(2, 1, 8, 8)
    torch.testing.assert_close(model(x), rankopt.load_compressed(model_file)(x))
    assert main(["export", str(path), "--out", str(tmp_path / "a.onnx"), "--format", "torchscript"]) == 1
    assert not (tmp_path / "a.onnx").exists()
    with pytest.warns(UserWarning, match="no checksum"):
        assert main(["export", str(path), "--out", str(tmp_path / "a.ts"), "--format", "torchscript",
                     "--allow-unchecked"]) == 0
    assert (tmp_path / "a.ts").is_file()


def test_download_arguments_are_switched_off_and_urls_refused() -> None:
    kwargs = {"num_classes": 10, "weights": "DEFAULT", "options": {"weights_backbone": "IMAGENET1K_V1",
              "pretrained": True, "download": True, "dropout": 0.2}}
    assert offline_kwargs(kwargs, "x") == {"num_classes": 10, "weights": None, "options": {
        "weights_backbone": None, "pretrained": False, "download": False, "dropout": 0.2}}
    with pytest.raises(ArtifactError, match="is a URL; loading a model file never fetches"):
        offline_kwargs({"options": {"checkpoint": "https://example.com/w.pth"}}, "x")


def test_a_file_naming_pretrained_weights_loads_without_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.hub
    import torchvision.models._api as tv_api

    fetched: list[str] = []

    def no_network(url: str, *args: Any, **kwargs: Any) -> Any:
        fetched.append(url)
        raise OSError("the test has no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", no_network, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    torch.manual_seed(0)
    net = rankopt.model("tv.squeezenet1_1", num_classes=10)
    spec: dict[str, Any] = {}
    forged = save_compressed(tmp_path / "pretrained.pt", net, spec,
                             base={"model": "tv.squeezenet1_1", "kwargs": {"num_classes": 10, "weights": "DEFAULT"}},
                             input_shape=(1, 3, 64, 64))
    loaded = rankopt.load_compressed(forged)
    assert fetched == []
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), net.eval()(x))


def test_inspect_of_a_run_whose_reference_names_pretrained_weights_stays_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rankopt.cli import inspect_cmd

    fetched: list[str] = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda url, *a, **k: fetched.append(url) or (_ for _ in ()).throw(OSError("offline")))
    run = tmp_path / "run"
    (run / "reference").mkdir(parents=True)
    torch.manual_seed(0)
    net = rankopt.model("tv.squeezenet1_1", num_classes=10)
    torch.save(net.state_dict(), run / "reference" / "model.pt")
    (run / "reference" / "metrics.json").write_text(json.dumps({
        "base": {"model": "tv.squeezenet1_1", "kwargs": {"num_classes": 10, "weights": "DEFAULT"}},
        "input_shape": [1, 3, 64, 64]}))

    class NoStudy:
        def __init__(self, run_dir: Path) -> None:
            self.model_modules: list[str] = []
            self.model_folders: list[str] = []

    monkeypatch.setattr("rankopt.results.reading.StudyResult", NoStudy)
    model, shape, _ = inspect_cmd.load_run_reference(run)
    assert fetched == [] and shape == (1, 3, 64, 64)
    torch.testing.assert_close(model.state_dict()["classifier.1.weight"], net.state_dict()["classifier.1.weight"])


# -- spectral cache entries (issue 26, item 12) -----------------------------------------------


def _entry_paths(cache_dir: Path, kind: str) -> list[Path]:
    return sorted(cache_dir.rglob(f"*.{kind}.pt"))


@pytest.mark.parametrize("damage", ["nan", "zero_stride", "huge", "shape", "complex"])
def test_a_bad_spectral_cache_entry_is_recomputed_with_its_reason(tmp_path: Path, damage: str) -> None:
    from rankopt.compression.spectral import SpectralCache

    matrix = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    SpectralCache(tmp_path).svd(matrix)
    (s_path,) = _entry_paths(tmp_path, "s")
    (svd_path,) = _entry_paths(tmp_path, "svd")
    u, s, vh = torch.load(svd_path, weights_only=True)
    bad_s = {
        "nan": torch.full_like(s, float("nan")),
        "zero_stride": torch.zeros(1, dtype=torch.float64).expand(16 * GiB // 8),
        "huge": torch.empty(16 * GiB // 8, dtype=torch.float64, device="meta"),
        "shape": torch.ones(5, dtype=torch.float64),
        "complex": s.to(torch.complex128),
    }[damage]
    torch.save(bad_s, s_path)
    torch.save((u, bad_s, vh), svd_path)
    reason = {"nan": "not finite", "zero_stride": "zero stride", "huge": "records hold",
              "shape": "not the float64", "complex": "is complex"}[damage]
    fresh = SpectralCache(tmp_path)
    with pytest.warns(RuntimeWarning, match=reason):
        values = fresh.singular_values(matrix)
    torch.testing.assert_close(values, torch.linalg.svdvals(matrix.double()))
    assert fresh.svd_calls == 1
    u2, s2, vh2 = fresh.svd(matrix)  # its bad entry was reported above, once
    torch.testing.assert_close(u2 @ torch.diag(s2) @ vh2, matrix.double())
    assert fresh.svd_calls == 2
    # the entries were rewritten: a third process reads them without a word
    again = SpectralCache(tmp_path)
    torch.testing.assert_close(again.singular_values(matrix), values)
    assert again.svd_calls == 0


def test_a_huge_declared_input_shape_is_refused(model_file: Path, tmp_path: Path) -> None:
    payload = _payload(model_file)
    payload["input_shape"] = [1, 1, 100000, 100000]
    path = _save(payload, tmp_path / "shape.pt")
    with pytest.raises(ArtifactError, match="10,000,000,000 values per sample"):
        read_compressed(path)
    assert main(["export", str(path), "--out", str(tmp_path / "x.onnx")]) == 1


def test_shared_storages_and_views_are_not_counted_twice(tmp_path: Path) -> None:
    from rankopt.core.safe_load import load_checked

    w = torch.randn(300, 200)
    torch.save({"a": w, "tied": w, "rows": w[:10], "transposed": w.T}, tmp_path / "tied.pt")
    out = load_checked(tmp_path / "tied.pt", "tied.pt")
    assert out["a"].data_ptr() == out["tied"].data_ptr()
    torch.testing.assert_close(out["transposed"], w.T)
    with pytest.raises(ArtifactError, match="more than the bound of 100,000"):
        load_checked(tmp_path / "tied.pt", "tied.pt", max_bytes=100_000)
