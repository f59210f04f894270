"""What a dataset plugin returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

__all__ = ["DatasetSplits"]


@dataclass
class DatasetSplits:
    """Train/validation (and optional test) splits of a labelled image dataset.

    Accuracy during search is measured on ``val``; ``test`` is only for the final
    report of picked models.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W) of one sample
    test: Dataset | None = None
