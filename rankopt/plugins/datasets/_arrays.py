"""In-memory image datasets and the split/normalization helpers of the built-in datasets.

Small datasets (digits, MNIST, CIFAR) fit in memory as uint8 tensors; keeping them
there makes loading a trial's data a matter of milliseconds. Samples are normalized
(and augmented) when fetched, batch-wise through ``__getitems__`` so the DataLoader
does not pay a Python call per sample for the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["ArrayDataset", "RandomCropFlip", "split_indices", "channel_stats", "crop_flip"]

Augment = Callable[[torch.Tensor], torch.Tensor]


class ArrayDataset(Dataset):
    """Images (N, C, H, W) and integer labels held in memory.

    Items are ``(image, label)``: ``image`` a float32 tensor (C, H, W), scaled by
    ``scale`` (1/255 for uint8 pixels), then normalized with ``mean``/``std`` per
    channel; ``label`` a Python int. ``augment`` (a transform of a raw (B, C, H, W)
    batch, before scaling, random per image) is applied on each fetch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        scale: float | None = None,
        augment: Augment | None = None,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels must be (N,) with N = {images.shape[0]}, got shape {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        if scale is None:
            scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        self.scale = float(scale)
        channels = images.shape[1]
        self.mean = torch.tensor(mean if mean is not None else [0.0] * channels).view(1, -1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * channels).view(1, -1, 1, 1)
        if self.mean.numel() != channels or self.std.numel() != channels:
            raise ValueError(
                f"mean/std must have one value per channel ({channels}), got "
                f"{self.mean.numel()} and {self.std.numel()}"
            )
        self.augment = augment

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _prepare(self, raw: torch.Tensor) -> torch.Tensor:
        if self.augment is not None:
            raw = self.augment(raw)
        x = raw.to(torch.float32) * self.scale
        return (x - self.mean) / self.std

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._prepare(self.images[index].unsqueeze(0))[0]
        return image, int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self._prepare(self.images[idx])
        return list(zip(images.unbind(0), self.labels[idx].tolist()))

    def subset(self, indices: Sequence[int] | np.ndarray, *, augment: Augment | None = None) -> ArrayDataset:
        """A new dataset of the given samples with the same normalization."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ArrayDataset(
            self.images[idx],
            self.labels[idx],
            mean=self.mean.flatten().tolist(),
            std=self.std.flatten().tolist(),
            scale=self.scale,
            augment=augment,
        )


def split_indices(
    labels: np.ndarray, holdout: float | int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (kept, held-out) index arrays, stratified by label when possible.

    ``holdout`` is a fraction in (0, 1) or a count. Stratification needs every class
    twice and at least one held-out sample per class; otherwise the split is a plain
    seeded random one. Both arrays come back sorted, so datasets keep their order.
    """
    from sklearn.model_selection import train_test_split  # sklearn imports slowly: on use only

    indices = np.arange(len(labels))
    _, counts = np.unique(labels, return_counts=True)
    n_holdout = holdout if isinstance(holdout, int) else int(np.ceil(holdout * len(labels)))
    stratify = labels if counts.min() >= 2 and len(counts) <= n_holdout <= len(labels) - len(counts) else None
    kept, held = train_test_split(
        indices, test_size=holdout, random_state=seed, shuffle=True, stratify=stratify
    )
    return np.sort(kept), np.sort(held)


def channel_stats(images: torch.Tensor, scale: float) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of (N, C, H, W) images after scaling."""
    c = images.shape[1]
    sums = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    n = 0
    for chunk in images.split(4096):  # bounded memory for large uint8 sets
        x = chunk.to(torch.float64) * scale
        sums += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = sums / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt().clamp_min(1e-8)
    return mean.tolist(), std.tolist()


class RandomCropFlip:
    """Random crop after zero padding, and a random horizontal flip, per image of a batch.

    The same distribution as torchvision's ``RandomCrop(size, padding)`` followed by
    ``RandomHorizontalFlip()``: an offset uniform in [0, 2 * padding] per axis and a
    flip with probability 1/2, drawn independently for every image from torch's RNG.
    Written by hand because torchvision's transforms draw one set of parameters per
    call, so a batch would share one crop, and calling them image by image is about
    three times slower on CIFAR-10 (benchmarks/RESULTS.md, "Training loop and datasets").
    """

    def __init__(self, padding: int, flip: bool = True) -> None:
        self.padding = int(padding)
        self.flip = flip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.padding
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b,))
        dx = torch.randint(0, 2 * p + 1, (b,))
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
        batch = torch.arange(b)[:, None, None, None]
        channel = torch.arange(c)[None, :, None, None]
        out = padded[batch, channel, rows, cols]
        if self.flip:
            flipped = torch.rand(b) < 0.5
            out = torch.where(flipped[:, None, None, None], out.flip(-1), out)
        return out

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"


def crop_flip(padding: int, flip: bool) -> Augment:
    """The CIFAR augmentation: random crop after zero padding, optional horizontal flip."""
    return RandomCropFlip(padding, flip)
