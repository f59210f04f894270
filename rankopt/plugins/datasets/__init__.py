"""Built-in datasets, one module per source."""

from rankopt.contract.dataset import DatasetSplits

__all__ = ["DatasetSplits", "BUILTIN"]

BUILTIN: tuple[str, ...] = (
    "rankopt.plugins.datasets.digits",
    "rankopt.plugins.datasets.npz",
    "rankopt.plugins.datasets.torchvision_sets",
    "rankopt.plugins.datasets.imagefolder",
)
