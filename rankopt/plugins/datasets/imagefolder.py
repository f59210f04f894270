"""Images in class folders (``root/<split>/<class>/<image>``) through torchvision's ImageFolder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.datasets._arrays import split_indices
from rankopt.plugins.datasets._params import check_fraction, check_positive_int, checked_params
from rankopt.contract.dataset import DatasetSplits
from rankopt.core.records import DatasetInfo

__all__ = ["load_imagefolder_splits", "IMAGENET_MEAN", "IMAGENET_STD"]

_OWNER = "dataset 'imagefolder'"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transforms(image_size: int, mean: Sequence[float], std: Sequence[float], train: bool, augment: bool) -> Any:
    from torchvision.transforms import v2

    if train and augment:
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        # the usual evaluation crop: resize the short side to size/0.875, centre crop
        geometry = [v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([
        v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
    ])


def _folder(path: Path, transform: Any, field: str) -> Any:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(
            f"{_OWNER}: cannot read the {field} images at {str(path)!r}: {exc}. Expected one "
            "sub-folder per class holding the images (e.g. train/cat/001.jpg)"
        ) from None


@checked_params("dataset", "imagefolder")
def load_imagefolder_splits(
    *,
    root: str | Path,
    image_size: int = 224,
    val_fraction: float | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = False,
    channels: int = 3,
    seed: int = 0,
) -> DatasetSplits:
    """Splits of a folder tree read lazily with ``torchvision.datasets.ImageFolder``.

    ``root`` holds ``train/`` and ``val/`` (and optionally ``test/``), each with one
    folder per class; or, with ``val_fraction``, the class folders themselves (a
    seeded, stratified share is held out for validation). Images are converted to
    ``channels`` (3: RGB, 1: grayscale), resized (short side to image_size/0.875) and
    centre-cropped to ``image_size``; with ``augment`` training images get a random
    resized crop and flip instead. ``mean``/``std`` default to ImageNet's.
    """
    if not isinstance(root, (str, Path)):
        raise ConfigError(f"{_OWNER}: root must be a directory path, got {root!r}")
    check_positive_int(_OWNER, "image_size", image_size)
    check_positive_int(_OWNER, "seed", seed, minimum=0)
    if channels not in (1, 3):
        raise ConfigError(f"{_OWNER}: channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    mean, std = list(mean), list(std)
    if len(mean) == 1:
        mean = mean * channels
    if len(std) == 1:
        std = std * channels
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"{_OWNER}: mean and std need {channels} values, got {mean!r} and {std!r}")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise ConfigError(f"{_OWNER}: root {str(root_path)!r} is not a directory")

    def transform(train: bool) -> Any:
        t = _transforms(image_size, mean, std, train, augment)
        if channels == 1:
            from torchvision.transforms import v2

            return v2.Compose([v2.Grayscale(1), t])
        return t

    test = None
    if val_fraction is None:
        if not (root_path / "train").is_dir() or not (root_path / "val").is_dir():
            raise ConfigError(
                f"{_OWNER}: {str(root_path)!r} must hold train/ and val/ class folders, "
                "or give val_fraction to split the class folders under root"
            )
        train = _folder(root_path / "train", transform(True), "train")
        val = _folder(root_path / "val", transform(False), "val")
        if (root_path / "test").is_dir():
            test = _folder(root_path / "test", transform(False), "test")
        for field, other in (("val", val), ("test", test)):
            if other is not None and other.classes != train.classes:
                raise ConfigError(
                    f"{_OWNER}: the {field}/ class folders {other.classes} differ from "
                    f"train/'s {train.classes}; every split needs the same classes"
                )
        classes = train.classes
    else:
        fraction = check_fraction(_OWNER, "val_fraction", val_fraction, allow_zero=False)
        base = root_path / "train" if (root_path / "train").is_dir() else root_path
        train_view = _folder(base, transform(True), "train")
        val_view = _folder(base, transform(False), "val")
        kept, held = split_indices(np.asarray(train_view.targets), fraction, seed)
        train, val = Subset(train_view, kept.tolist()), Subset(val_view, held.tolist())
        classes = train_view.classes
    return DatasetSplits(
        train=train,
        val=val,
        num_classes=len(classes),
        input_shape=(channels, image_size, image_size),
        test=test,
    )


@hookimpl
def rankopt_datasets() -> list[DatasetInfo]:
    return [
        DatasetInfo(
            "imagefolder",
            load_imagefolder_splits,
            "class folders read with torchvision ImageFolder; params: root, image_size, "
            "val_fraction, mean, std, augment, channels, seed",
        )
    ]
