"""Numpy archives of images: ``x`` uint8 (N, H, W, C) and ``y`` int64, as in ``../shared/data``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankopt.core.errors import ConfigError
from rankopt.contract.hookspecs import hookimpl
from rankopt.plugins.datasets._arrays import ArrayDataset, channel_stats, crop_flip, split_indices
from rankopt.plugins.datasets._params import check_fraction, check_positive_int, checked_params
from rankopt.contract.dataset import DatasetSplits
from rankopt.core.records import DatasetInfo

__all__ = ["load_npz_splits", "read_archives"]

_OWNER = "dataset 'npz'"
_SPLITS = ("train", "val", "test")
Paths = str | Path | Sequence[str | Path]


def read_archives(paths: Paths, *, root: str | Path | None = None, field: str = "train",
                  limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ``(x, y)`` of the archives, ``x`` as (N, C, H, W), ``y`` int64.

    ``x`` may be (N, H, W, C) or (N, H, W) (one channel); ``limit`` keeps the first N
    samples, and reading stops as soon as it is reached.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise ConfigError(f"{_OWNER}: {field} must name at least one .npz file, got an empty list")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    have = 0
    for item in items:
        if not isinstance(item, (str, Path)):
            raise ConfigError(f"{_OWNER}: {field} must be a path or a list of paths, got {item!r}")
        path = Path(item).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root).expanduser() / path
        if not path.is_file():
            raise ConfigError(
                f"{_OWNER}: {field} file {str(path)!r} does not exist; give the path of a numpy "
                "archive with arrays 'x' (uint8, N x H x W x C) and 'y' (int64), relative to "
                "the working directory or to `root`"
            )
        try:
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive.files or "y" not in archive.files:
                    raise ConfigError(
                        f"{_OWNER}: {str(path)!r} must hold arrays 'x' and 'y', "
                        f"it holds {sorted(archive.files)}"
                    )
                x, y = archive["x"], archive["y"]
        except (OSError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{_OWNER}: cannot read {str(path)!r} as a numpy archive: {exc}") from None
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ConfigError(
                f"{_OWNER}: {str(path)!r}: expected x of shape (N, H, W, C) and y of shape (N,), "
                f"got x {x.shape} and y {y.shape}"
            )
        if not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"{_OWNER}: {str(path)!r}: y must hold integer labels, got {y.dtype}")
        if limit is not None:
            x, y = x[: limit - have], y[: limit - have]
        xs.append(x)
        ys.append(y.astype(np.int64))
        have += len(y)
        if limit is not None and have >= limit:
            break
    shapes = {a.shape[1:] for a in xs}
    if len(shapes) > 1:
        raise ConfigError(f"{_OWNER}: the {field} files hold images of different shapes {sorted(shapes)}")
    x = np.ascontiguousarray(np.concatenate(xs).transpose(0, 3, 1, 2))
    return x, np.concatenate(ys)


def _limits(limit: Any) -> dict[str, int | None]:
    if limit is None:
        return dict.fromkeys(_SPLITS)
    if isinstance(limit, Mapping):
        unknown = sorted(set(limit) - set(_SPLITS))
        if unknown:
            raise ConfigError(
                f"{_OWNER}: limit keys must be among {', '.join(_SPLITS)}, got {', '.join(map(repr, unknown))}"
            )
        return {s: (None if limit.get(s) is None else check_positive_int(_OWNER, f"limit.{s}", limit[s]))
                for s in _SPLITS}
    n = check_positive_int(_OWNER, "limit", limit)
    return dict.fromkeys(_SPLITS, n)


def _stats(values: Any, field: str, channels: int) -> list[float] | None:
    if values is None:
        return None
    seq = [values] if isinstance(values, (int, float)) else list(values)
    if len(seq) == 1:
        seq = seq * channels
    if len(seq) != channels or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seq):
        raise ConfigError(
            f"{_OWNER}: {field} must be one number or one per channel ({channels}), got {values!r}"
        )
    if field == "std" and any(v <= 0 for v in seq):
        raise ConfigError(f"{_OWNER}: std values must be > 0, got {values!r}")
    return [float(v) for v in seq]


@checked_params("dataset", "npz")
def load_npz_splits(
    *,
    train: Paths,
    val: Paths | None = None,
    test: Paths | None = None,
    val_fraction: float | None = None,
    root: str | Path | None = None,
    limit: int | Mapping[str, int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    num_classes: int | None = None,
    augment: bool = False,
    seed: int = 0,
) -> DatasetSplits:
    """Splits read from numpy archives (``x`` uint8 N x H x W x C, ``y`` int labels).

    Args:
        train: a path or a list of paths whose samples are concatenated in order.
        val: the validation archive(s); or leave it out and give ``val_fraction`` to
            carve a seeded, stratified validation split out of ``train``.
        test: optional archive(s) for the final report.
        root: directory that relative paths are resolved against (default: the
            working directory).
        limit: keep only the first N samples of each split (one int for all, or a
            mapping such as ``{"train": 5000, "val": 1000}``); applied to the files'
            samples before ``val_fraction`` carves validation out of train.
        mean, std: per-channel normalization of the pixels scaled to [0, 1];
            computed from the training split when absent.
        num_classes: default: the largest label + 1 over all splits.
        augment: random crop (zero padding of H/8) and horizontal flip of training images.
        seed: fixes the ``val_fraction`` split.
    """
    check_positive_int(_OWNER, "seed", seed, minimum=0)
    if val is None and val_fraction is None:
        raise ConfigError(f"{_OWNER}: give `val` (validation archive paths) or `val_fraction` (e.g. 0.1)")
    if val is not None and val_fraction is not None:
        raise ConfigError(f"{_OWNER}: give either `val` or `val_fraction`, not both (got val={val!r}, "
                          f"val_fraction={val_fraction!r})")
    if val_fraction is not None:
        val_fraction = check_fraction(_OWNER, "val_fraction", val_fraction, allow_zero=False)
    if num_classes is not None:
        check_positive_int(_OWNER, "num_classes", num_classes)
    limits = _limits(limit)

    x_train, y_train = read_archives(train, root=root, field="train", limit=limits["train"])
    if val is not None:
        x_val, y_val = read_archives(val, root=root, field="val", limit=limits["val"])
    else:
        kept, held = split_indices(y_train, val_fraction, seed)  # type: ignore[arg-type]
        x_val, y_val = x_train[held], y_train[held]
        if limits["val"] is not None:
            x_val, y_val = x_val[: limits["val"]], y_val[: limits["val"]]
        x_train, y_train = x_train[kept], y_train[kept]
    tested = read_archives(test, root=root, field="test", limit=limits["test"]) if test is not None else None

    shape = tuple(int(d) for d in x_train.shape[1:])
    for field, arr in (("val", x_val), ("test", None if tested is None else tested[0])):
        if arr is not None and tuple(arr.shape[1:]) != shape:
            raise ConfigError(
                f"{_OWNER}: {field} images have shape {tuple(arr.shape[1:])} (C, H, W), "
                f"train images {shape}; all splits must match"
            )
    labels = [y_train, y_val] + ([tested[1]] if tested is not None else [])
    top = int(max(y.max() for y in labels if len(y))) + 1
    low = int(min(y.min() for y in labels if len(y)))
    if low < 0:
        raise ConfigError(f"{_OWNER}: labels must be >= 0, found {low}")
    if num_classes is None:
        num_classes = top
    elif top > num_classes:
        raise ConfigError(f"{_OWNER}: num_classes={num_classes} but a label {top - 1} occurs; raise num_classes")

    images = torch.from_numpy(x_train)
    scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    channels = shape[0]
    mean_l, std_l = _stats(mean, "mean", channels), _stats(std, "std", channels)
    if mean_l is None or std_l is None:
        computed = channel_stats(images, scale)
        mean_l = mean_l or computed[0]
        std_l = std_l or computed[1]
    aug = crop_flip(padding=max(1, shape[1] // 8), flip=True) if augment else None

    def make(x: np.ndarray, y: np.ndarray, augment_fn: Any = None) -> ArrayDataset:
        return ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), mean=mean_l, std=std_l,
                            scale=scale, augment=augment_fn)

    return DatasetSplits(
        train=make(x_train, y_train, aug),
        val=make(x_val, y_val),
        num_classes=num_classes,
        input_shape=shape,  # type: ignore[arg-type]
        test=make(*tested) if tested is not None else None,
    )


@hookimpl
def rankopt_datasets() -> list[DatasetInfo]:
    return [
        DatasetInfo(
            "npz",
            load_npz_splits,
            "numpy archives with x (uint8 NHWC) and y (int64); params: train, val or "
            "val_fraction, test, root, limit, mean, std, num_classes, augment, seed",
        )
    ]
