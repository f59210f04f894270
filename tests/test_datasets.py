"""Built-in datasets: digits, npz archives, torchvision sets, image folders."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import rankopt
from rankopt.core.errors import ConfigError
from rankopt.plugins.datasets._params import ParameterError

SHARED_DATA = next(
    (p for p in (Path("../shared/data"), Path(__file__).resolve().parents[2] / "shared" / "data")
     if (p / "mnist_test.npz").is_file()),
    None,
)


def _all(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    return x, y


# -- digits ---------------------------------------------------------------------------


def test_digits_shapes_split_sizes_and_normalization() -> None:
    splits = rankopt.dataset("digits")
    assert splits.num_classes == 10 and splits.input_shape == (1, 8, 8)
    assert (len(splits.train), len(splits.val), splits.test) == (1437, 360, None)
    x, y = _all(splits.train)
    assert x.shape == (1437, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    # normalized with the training split's own statistics
    assert abs(float(x.mean())) < 1e-4 and float(x.std()) == pytest.approx(1.0, abs=1e-3)
    # stratified: every class is about 20 % of its images in validation
    _, val_y = _all(splits.val)
    counts = torch.bincount(val_y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38
    image, label = splits.train[5]
    assert isinstance(label, int) and torch.equal(image, x[5])


def test_digits_test_fraction_and_seeding() -> None:
    splits = rankopt.dataset("digits", val_fraction=0.2, test_fraction=0.1, seed=3)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.test) == 180 and len(splits.val) == 360
    again = rankopt.dataset("digits", val_fraction=0.2, test_fraction=0.1, seed=3)
    other = rankopt.dataset("digits", val_fraction=0.2, test_fraction=0.1, seed=4)
    assert torch.equal(_all(splits.val)[0], _all(again.val)[0])
    assert not torch.equal(_all(splits.val)[0], _all(other.val)[0])
    # the three splits are disjoint: no image appears twice across them (digits has few
    # exact duplicates, so compare the sets of raw rows with multiplicity)
    from sklearn.datasets import load_digits

    total = len({r.tobytes() for r in load_digits().images})
    seen = set()
    for part in (splits.train, splits.val, splits.test):
        seen |= {r.numpy().tobytes() for r in _all(part)[0]}
    assert len(seen) == total


def test_digits_rejects_bad_params() -> None:
    with pytest.raises(ParameterError, match=r"dataset 'digits' got unknown parameter\(s\) 'val_frac'; "
                       r"it accepts: val_fraction, test_fraction, seed") as info:
        rankopt.dataset("digits", val_frac=0.1)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, TypeError)
    with pytest.raises(ConfigError, match=r"val_fraction must be a number in \(0, 1\), got 1.5"):
        rankopt.dataset("digits", val_fraction=1.5)
    with pytest.raises(ConfigError, match=r"val_fraction \+ test_fraction must be < 1"):
        rankopt.dataset("digits", val_fraction=0.5, test_fraction=0.5)


# -- npz ------------------------------------------------------------------------------


def _write_npz(path: Path, n: int, seed: int, shape=(6, 6, 3)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    y = (np.arange(n) % 4).astype(np.int64)
    np.savez_compressed(path, x=x, y=y)
    return x, y


def test_npz_reads_archives_in_the_shared_data_format(tmp_path: Path) -> None:
    x1, y1 = _write_npz(tmp_path / "train_1.npz", 20, 0)
    x2, y2 = _write_npz(tmp_path / "train_2.npz", 12, 1)
    xv, yv = _write_npz(tmp_path / "val.npz", 8, 2)
    splits = rankopt.dataset("npz", train=["train_1.npz", "train_2.npz"], val="val.npz",
                             test=str(tmp_path / "val.npz"), root=str(tmp_path))
    assert splits.input_shape == (3, 6, 6) and splits.num_classes == 4
    assert (len(splits.train), len(splits.val), len(splits.test)) == (32, 8, 8)
    raw = np.concatenate([x1, x2]).astype(np.float64) / 255.0
    mean, std = raw.mean(axis=(0, 1, 2)), raw.std(axis=(0, 1, 2))
    x, y = _all(splits.train)
    expected = (raw.transpose(0, 3, 1, 2) - mean[:, None, None]) / std[:, None, None]
    assert np.allclose(x.numpy(), expected, atol=1e-5)
    assert y.tolist() == np.concatenate([y1, y2]).tolist()
    val_x, val_y = _all(splits.val)
    assert np.allclose(val_x.numpy(), (xv.transpose(0, 3, 1, 2) / 255.0 - mean[:, None, None])
                       / std[:, None, None], atol=1e-5)


def test_npz_limit_val_fraction_and_given_stats(tmp_path: Path) -> None:
    x, y = _write_npz(tmp_path / "a.npz", 40, 0, shape=(5, 5))  # N x H x W: one channel
    splits = rankopt.dataset("npz", train=tmp_path / "a.npz", val_fraction=0.25, limit={"train": 32},
                             mean=0.5, std=0.25)
    assert splits.input_shape == (1, 5, 5)
    assert len(splits.train) + len(splits.val) == 32 and len(splits.val) == 8
    # validation is stratified over the first 32 samples, two of each class
    assert sorted(_all(splits.val)[1].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    train_x, _ = _all(splits.train)
    values = {round(float(v), 4) for v in ((x[:32].astype(np.float64) / 255 - 0.5) / 0.25).ravel()}
    assert {round(float(v), 4) for v in train_x.ravel()} <= values
    limited = rankopt.dataset("npz", train=tmp_path / "a.npz", val=tmp_path / "a.npz", limit=10)
    assert len(limited.train) == 10 and _all(limited.val)[1].tolist() == y[:10].tolist()


def test_npz_augment_changes_train_images_only(tmp_path: Path) -> None:
    _write_npz(tmp_path / "a.npz", 16, 0, shape=(16, 16, 3))
    plain = rankopt.dataset("npz", train=tmp_path / "a.npz", val=tmp_path / "a.npz")
    augmented = rankopt.dataset("npz", train=tmp_path / "a.npz", val=tmp_path / "a.npz", augment=True)
    torch.manual_seed(0)
    assert not torch.equal(_all(plain.train)[0], _all(augmented.train)[0])
    assert torch.equal(_all(plain.val)[0], _all(augmented.val)[0])
    assert _all(augmented.train)[0].shape == (16, 3, 16, 16)


def test_npz_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train file '.*missing\.npz' does not exist"):
        rankopt.dataset("npz", train=tmp_path / "missing.npz", val_fraction=0.1)
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 1), np.uint8))
    with pytest.raises(ConfigError, match=r"must hold arrays 'x' and 'y', it holds \['images'\]"):
        rankopt.dataset("npz", train=tmp_path / "bad.npz", val_fraction=0.1)
    _write_npz(tmp_path / "a.npz", 8, 0)
    with pytest.raises(ConfigError, match=r"give `val` .* or `val_fraction`"):
        rankopt.dataset("npz", train=tmp_path / "a.npz")
    with pytest.raises(ConfigError, match=r"limit keys must be among train, val, test, got 'tran'"):
        rankopt.dataset("npz", train=tmp_path / "a.npz", val_fraction=0.5, limit={"tran": 3})
    with pytest.raises(ParameterError, match=r"dataset 'npz' got unknown parameter\(s\) 'vall'.*accepts: train, val"):
        rankopt.dataset("npz", train=tmp_path / "a.npz", vall=tmp_path / "a.npz")


@pytest.mark.skipif(SHARED_DATA is None, reason="the shared data folder ../shared/data is absent")
def test_npz_reads_the_shared_mnist_test_set() -> None:
    splits = rankopt.dataset("npz", train="mnist_test.npz", val="mnist_test.npz", root=str(SHARED_DATA),
                             limit=100, mean=0.1307, std=0.3081)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10 and len(splits.train) == 100
    with np.load(SHARED_DATA / "mnist_test.npz") as archive:
        x_raw, y_raw = archive["x"][:100], archive["y"][:100]
    x, y = _all(splits.train)
    assert y.tolist() == y_raw.tolist()
    expected = (x_raw.transpose(0, 3, 1, 2).astype(np.float32) / 255 - 0.1307) / 0.3081
    assert np.allclose(x.numpy(), expected, atol=1e-5)


# -- torchvision sets -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layout"),
    [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
     ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")],
)
def test_torchvision_sets_without_files_say_where_to_put_them(tmp_path: Path, name: str, layout: str) -> None:
    with pytest.raises(ConfigError, match=rf"dataset '{name}'.*Put them at .*{layout}.*download: true"):
        rankopt.dataset(name, root=str(tmp_path))


def _write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_mnist_reads_files_in_torchvision_layout(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    train_y = (np.arange(40) % 10).astype(np.uint8)
    test_x = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    _write_idx(raw, "train", train_x, train_y)
    _write_idx(raw, "t10k", test_x, np.arange(10, dtype=np.uint8))
    splits = rankopt.dataset("mnist", root=str(tmp_path), val_size=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert sorted(_all(splits.val)[1].tolist()) == list(range(10))  # stratified
    test_images, test_labels = _all(splits.test)
    assert test_labels.tolist() == list(range(10))
    expected = (test_x[:, None].astype(np.float32) / 255 - 0.1307) / 0.3081
    assert np.allclose(test_images.numpy(), expected, atol=1e-5)
    shared = rankopt.dataset("mnist", root=str(tmp_path), val_fraction=0.0)
    assert len(shared.train) == 40 and torch.equal(_all(shared.val)[0], test_images)


# -- image folders ----------------------------------------------------------------------


def _image_tree(root: Path, classes=("cat", "dog"), per_class: int = 3) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12, 10), color=(200 * label, 40 * i, 90)).save(folder / f"{i}.png")


def test_imagefolder_reads_train_and_val_folders(tmp_path: Path) -> None:
    _image_tree(tmp_path)
    splits = rankopt.dataset("imagefolder", root=str(tmp_path), image_size=8)
    assert splits.num_classes == 2 and splits.input_shape == (3, 8, 8)
    assert len(splits.train) == 6 and len(splits.val) == 6 and splits.test is None
    x, y = _all(splits.val)
    assert x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    # a flat colour image: red channel 0 for cats, 200/255 for dogs, ImageNet-normalized
    assert float(x[0, 0].mean()) == pytest.approx((0 - 0.485) / 0.229, abs=1e-3)
    assert float(x[3, 0].mean()) == pytest.approx((200 / 255 - 0.485) / 0.229, abs=1e-2)
    grey = rankopt.dataset("imagefolder", root=str(tmp_path / "train"), image_size=8, val_fraction=0.5,
                           channels=1, mean=[0.5], std=[0.5])
    assert grey.input_shape == (1, 8, 8) and len(grey.train) == 3 and len(grey.val) == 3
    assert grey.val[0][0].shape == (1, 8, 8)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        rankopt.dataset("imagefolder", root=str(tmp_path / "nope"))
    _image_tree(tmp_path / "a")
    with pytest.raises(ConfigError, match=r"must hold train/ and val/"):
        rankopt.dataset("imagefolder", root=str(tmp_path / "a" / "train"))
    _image_tree(tmp_path / "b")
    (tmp_path / "b" / "val" / "dog").rename(tmp_path / "b" / "val" / "wolf")
    with pytest.raises(ConfigError, match=r"val/ class folders \['cat', 'wolf'\] differ"):
        rankopt.dataset("imagefolder", root=str(tmp_path / "b"))


def test_random_crop_flip_draws_a_crop_and_flip_per_image() -> None:
    from rankopt.plugins.datasets._arrays import RandomCropFlip

    torch.manual_seed(0)
    images = torch.randint(1, 256, (64, 3, 6, 6), dtype=torch.uint8)
    out = RandomCropFlip(padding=2)(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    found = []
    for i in range(64):
        matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 6, dx:dx + 6]))]
        assert len(matches) == 1  # every output is exactly one crop (and flip) of its own image
        found.append(matches[0])
    assert len({(dy, dx) for dy, dx, _ in found}) > 10 and {f for _, _, f in found} == {False, True}
