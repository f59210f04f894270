"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 through torchvision, held in memory.

torchvision reads (and, with ``download=True`` and a network, fetches) the official
files; the images are then kept as uint8 tensors and normalized on the fly, so a
trial's loader does not decode PIL images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.datasets._arrays import ArrayDataset, crop_flip, split_indices
from rankopt.plugins.datasets._params import check_fraction, check_positive_int, checked_params
from rankopt.contract.dataset import DatasetSplits
from rankopt.core.records import DatasetInfo

__all__ = ["TorchvisionSpec", "SPECS", "load_torchvision_splits"]


@dataclass(frozen=True)
class TorchvisionSpec:
    """How one torchvision dataset is read and normalized."""

    name: str
    torchvision_class: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str  # where torchvision expects the files, relative to root
    flip: bool  # whether a horizontal flip keeps the label (not for digits)
    title: str


_MNIST_FILES = (
    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
)

SPECS: dict[str, TorchvisionSpec] = {
    s.name: s
    for s in (
        TorchvisionSpec("mnist", "MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,),
                        f"MNIST/raw/ holding {_MNIST_FILES}", False, "MNIST handwritten digits"),
        TorchvisionSpec("fashion_mnist", "FashionMNIST", 10, (1, 28, 28), (0.2860,), (0.3530,),
                        f"FashionMNIST/raw/ holding {_MNIST_FILES}", True, "Fashion-MNIST clothing"),
        TorchvisionSpec("cifar10", "CIFAR10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                        (0.2470, 0.2435, 0.2616),
                        "cifar-10-batches-py/ holding data_batch_1..data_batch_5, test_batch, "
                        "batches.meta (the extracted cifar-10-python.tar.gz)", True, "CIFAR-10"),
        TorchvisionSpec("cifar100", "CIFAR100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409),
                        (0.2673, 0.2564, 0.2762),
                        "cifar-100-python/ holding train, test, meta (the extracted "
                        "cifar-100-python.tar.gz)", True, "CIFAR-100"),
    )
}


def _read(spec: TorchvisionSpec, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.torchvision_class)
    try:
        ds = cls(str(root), train=train, download=download)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower():
            raise
        raise ConfigError(
            f"dataset {spec.name!r}: the {spec.title} files are not under root={str(root)!r}. "
            f"Put them at {str(root / spec.layout.split(' ')[0])} ({spec.layout}), or pass "
            f"download: true on a machine with a network to let torchvision fetch them; "
            "without a network, the 'npz' dataset reads numpy archives instead"
        ) from None
    except OSError as exc:  # download=True without a network
        raise ConfigError(
            f"dataset {spec.name!r}: downloading {spec.title} to {str(root)!r} failed ({exc}); "
            f"copy the files there by hand ({spec.layout}) and use download: false"
        ) from None
    data = ds.data
    images = torch.as_tensor(np.asarray(data)) if not torch.is_tensor(data) else data
    if images.ndim == 3:  # MNIST-like: N x H x W
        images = images.unsqueeze(1)
    else:  # CIFAR: N x H x W x C
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return images.contiguous(), labels


def load_torchvision_splits(
    spec: TorchvisionSpec,
    *,
    root: str | Path = "data",
    download: bool = False,
    val_fraction: float = 0.1,
    val_size: int | None = None,
    augment: bool = False,
    seed: int = 0,
) -> DatasetSplits:
    """Train/val carved from the official training set; ``test`` is the official test set.

    Args:
        root: directory in torchvision's layout (see the error message for the files).
        download: let torchvision fetch the files (needs a network).
        val_fraction: share of the training set held out (seeded, stratified) for
            validation. ``0`` uses the official test set as validation too, as most
            papers report; search then tunes on the test set, so prefer a held-out share.
        val_size: a number of validation images instead of ``val_fraction``.
        augment: training images get a random crop after zero padding (4 px for
            32x32, 2 px for 28x28) and, where it keeps the label (not MNIST digits),
            a random horizontal flip.
        seed: fixes the validation split.
    """
    owner = f"dataset {spec.name!r}"
    if not isinstance(root, (str, Path)):
        raise ConfigError(f"{owner}: root must be a directory path, got {root!r}")
    val_fraction = check_fraction(owner, "val_fraction", val_fraction)
    if val_size is not None:
        check_positive_int(owner, "val_size", val_size)
    check_positive_int(owner, "seed", seed, minimum=0)
    root_path = Path(root).expanduser()

    images, labels = _read(spec, root_path, train=True, download=bool(download))
    test_images, test_labels = _read(spec, root_path, train=False, download=bool(download))
    mean, std = list(spec.mean), list(spec.std)
    aug = crop_flip(padding=spec.input_shape[1] // 8, flip=spec.flip) if augment else None
    full = ArrayDataset(images, labels, mean=mean, std=std)
    test = ArrayDataset(test_images, test_labels, mean=mean, std=std)

    if val_size is not None:
        if val_size >= len(labels):
            raise ConfigError(f"{owner}: val_size must be < {len(labels)} (the training set), got {val_size}")
        holdout: float | int = val_size
    else:
        holdout = val_fraction
    if holdout == 0:
        train, val = full.subset(np.arange(len(labels)), augment=aug), test
    else:
        kept, held = split_indices(labels.numpy(), holdout, seed)
        train, val = full.subset(kept, augment=aug), full.subset(held)
    return DatasetSplits(train=train, val=val, num_classes=spec.num_classes,
                         input_shape=spec.input_shape, test=test)


def _factory(spec: TorchvisionSpec):  # type: ignore[no-untyped-def]
    @checked_params("dataset", spec.name)
    def factory(
        *,
        root: str | Path = "data",
        download: bool = False,
        val_fraction: float = 0.1,
        val_size: int | None = None,
        augment: bool = False,
        seed: int = 0,
    ) -> DatasetSplits:
        return load_torchvision_splits(spec, root=root, download=download, val_fraction=val_fraction,
                                       val_size=val_size, augment=augment, seed=seed)

    factory.__name__ = f"load_{spec.name}"
    factory.__doc__ = f"{spec.title} through torchvision.\n\n" + (load_torchvision_splits.__doc__ or "")
    return factory


@hookimpl
def rankopt_datasets() -> list[DatasetInfo]:
    return [
        DatasetInfo(
            spec.name,
            _factory(spec),
            f"{spec.title} via torchvision ({spec.num_classes} classes, {'x'.join(map(str, spec.input_shape))}); "
            "params: root, download, val_fraction, val_size, augment, seed",
        )
        for spec in SPECS.values()
    ]
