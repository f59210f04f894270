"""scikit-learn's bundled 8x8 handwritten digits: the quickstart's dataset (offline, tiny)."""

from __future__ import annotations

import numpy as np
import torch

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.datasets._arrays import ArrayDataset, channel_stats, split_indices
from rankopt.plugins.datasets._params import check_fraction, check_positive_int, checked_params
from rankopt.contract.dataset import DatasetSplits
from rankopt.core.records import DatasetInfo

__all__ = ["load_digits_splits"]


@checked_params("dataset", "digits")
def load_digits_splits(
    *, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> DatasetSplits:
    """The 1,797 8x8 digits of ``sklearn.datasets.load_digits`` as 1x8x8 images, 10 classes.

    Pixels (0..16) are scaled to [0, 1] and normalized with the training split's mean
    and standard deviation. ``test_fraction`` of the images are held out first, then
    ``val_fraction`` of all images for validation; both splits are stratified by class
    and fixed by ``seed``. With the defaults: 1,437 train / 360 val images.
    """
    name = "dataset 'digits'"
    val_fraction = check_fraction(name, "val_fraction", val_fraction, allow_zero=False)
    test_fraction = check_fraction(name, "test_fraction", test_fraction)
    if val_fraction + test_fraction >= 1.0:
        raise ConfigError(
            f"{name}: val_fraction + test_fraction must be < 1 to leave training images, "
            f"got {val_fraction} + {test_fraction}"
        )
    check_positive_int(name, "seed", seed, minimum=0)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 16.0
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    y = bunch.target

    rest = np.arange(len(y))
    test_idx = None
    if test_fraction > 0:
        kept, held = split_indices(y, test_fraction, seed)
        rest, test_idx = kept, held
    # val_fraction is of all images, so rescale it to the images left after the test split
    kept, held = split_indices(y[rest], val_fraction / (1.0 - test_fraction), seed)
    train_idx, val_idx = rest[kept], rest[held]

    mean, std = channel_stats(images[train_idx], scale=1.0)
    full = ArrayDataset(images, labels, mean=mean, std=std, scale=1.0)
    return DatasetSplits(
        train=full.subset(train_idx),
        val=full.subset(val_idx),
        num_classes=10,
        input_shape=(1, 8, 8),
        test=full.subset(test_idx) if test_idx is not None else None,
    )


@hookimpl
def rankopt_datasets() -> list[DatasetInfo]:
    return [
        DatasetInfo(
            "digits",
            load_digits_splits,
            "scikit-learn 8x8 digits (1,797 images, 10 classes, offline); params: "
            "val_fraction, test_fraction, seed",
        )
    ]
