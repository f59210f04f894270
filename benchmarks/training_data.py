"""Throughput of the shared training loop and the in-memory datasets on this machine.

Measures, with the committed code and real data:
- digits + small_cnn (the quickstart pair): load time, training speed, validation accuracy;
- lenet5 on an MNIST subset and resnet20_cifar on a CIFAR-10 subset read with the ``npz``
  dataset from ``../shared/data`` (skipped when the folder is absent);
- the loader: batched fetching through ``ArrayDataset.__getitems__`` against one
  ``__getitem__`` call per sample (what a plain Dataset gets), with and without augmentation.

Run: ``.venv/bin/python benchmarks/training_data.py`` (add ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import rankopt  # noqa: E402
from _record import markdown_table as table  # noqa: E402
from rankopt.training.loop import evaluate, make_loader, train  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


class PerItem(Dataset):
    """Hides ``__getitems__`` so the DataLoader fetches sample by sample."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return self.inner[i]


def run_training(name: str, model_name: str, splits: rankopt.DatasetSplits, epochs: float, lr: float,
                 batch_size: int, test: Dataset | None = None, **model_kwargs) -> list[str]:
    torch.manual_seed(0)
    c, _, _ = splits.input_shape
    model = rankopt.model(model_name, num_classes=splits.num_classes, in_channels=c, **model_kwargs)
    loader = make_loader(splits.train, batch_size=batch_size, shuffle=True, seed=0)
    result = train(model, loader, epochs=epochs, lr=lr, seed=0, device="cpu")
    seen = min(result.steps * batch_size, int(result.epochs * len(splits.train)))
    start = time.perf_counter()
    accuracy = evaluate(model, make_loader(test if test is not None else splits.val, batch_size=512))
    eval_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return [name, model_name, f"{params:,}", f"{len(splits.train):,}", f"{result.epochs:g}",
            str(result.steps), f"{result.seconds:.1f}", f"{seen / result.seconds:,.0f}",
            f"{eval_s:.2f}", f"{accuracy:.3f}"]


def torchvision_augmented(dataset):  # type: ignore[no-untyped-def]
    """The same data with torchvision's per-image RandomCrop + RandomHorizontalFlip."""
    from torchvision.transforms import v2

    from rankopt.plugins.datasets._arrays import ArrayDataset

    per_image = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
    return ArrayDataset(dataset.images, dataset.labels, mean=dataset.mean.flatten().tolist(),
                        std=dataset.std.flatten().tolist(), scale=dataset.scale,
                        augment=lambda batch: torch.stack([per_image(img) for img in batch]))


def loader_pass(dataset: Dataset, batch_size: int) -> float:
    start = time.perf_counter()
    n = 0
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=True):
        n += x.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick

    rows: list[list[str]] = []
    start = time.perf_counter()
    rankopt.get_registry()
    registry_s = time.perf_counter() - start
    start = time.perf_counter()
    digits = rankopt.dataset("digits")
    digits_load = time.perf_counter() - start
    rows.append(run_training("digits", "small_cnn", digits, epochs=1 if quick else 5, lr=0.05, batch_size=64))

    data_rows: list[list[str]] = [["(plugin registry, first use)", f"{registry_s:.2f}"],
                                  ["digits (1,797 x 1x8x8, sklearn)", f"{digits_load:.2f}"]]
    loader_rows: list[list[str]] = []
    if (DATA / "mnist_train.npz").is_file():
        n_mnist = 2000 if quick else 10000
        start = time.perf_counter()
        mnist = rankopt.dataset("npz", train="mnist_train.npz", val="mnist_test.npz", root=str(DATA),
                                limit={"train": n_mnist, "val": 2000}, mean=0.1307, std=0.3081)
        data_rows.append([f"npz MNIST ({n_mnist:,} train + 2,000 val, limit)", f"{time.perf_counter() - start:.2f}"])
        rows.append(run_training("MNIST npz", "lenet5", mnist, epochs=1, lr=0.05, batch_size=64))

        start = time.perf_counter()
        cifar = rankopt.dataset("npz", train=[f"cifar10_train_{i}.npz" for i in range(1, 5)],
                                val="cifar10_train_5.npz", test="cifar10_test1k.npz", root=str(DATA))
        data_rows.append(["npz CIFAR-10 (40,000 train + 10,000 val + 1,000 test)",
                          f"{time.perf_counter() - start:.2f}"])
        n_cifar = 1000 if quick else 5000
        subset = rankopt.dataset("npz", train=[f"cifar10_train_{i}.npz" for i in range(1, 5)],
                                 val="cifar10_test1k.npz", root=str(DATA), limit={"train": n_cifar},
                                 mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616], augment=True)
        rows.append(run_training("CIFAR-10 npz (augment)", "resnet20_cifar", subset, epochs=1, lr=0.1,
                                 batch_size=128))
        augmented = rankopt.dataset("npz", train=[f"cifar10_train_{i}.npz" for i in range(1, 5)],
                                    val="cifar10_train_5.npz", root=str(DATA), augment=True,
                                    limit={"train": 10000})
        batched = loader_pass(cifar.val, 256)
        per_item = loader_pass(PerItem(cifar.val), 256)
        loader_rows.append(["CIFAR-10 10,000, no augmentation", "batched __getitems__", f"{batched:,.0f}",
                            "per-item __getitem__", f"{per_item:,.0f}", f"{batched / per_item:.1f}x"])
        batched = loader_pass(augmented.train, 256)
        per_item = loader_pass(PerItem(torchvision_augmented(augmented.train)), 256)
        loader_rows.append(["CIFAR-10 10,000, crop + flip", "batched RandomCropFlip", f"{batched:,.0f}",
                            "per-item torchvision v2", f"{per_item:,.0f}", f"{batched / per_item:.1f}x"])
    else:
        print(f"note: {DATA} is absent; MNIST/CIFAR rows skipped", file=sys.stderr)

    train_md = table(["data", "model", "params", "train images", "epochs", "steps", "train s",
                      "images/s", "eval s", "val accuracy"], rows)
    data_md = table(["dataset", "load s"], data_rows)
    loader_md = table(["loader pass (batch 256)", "rankopt", "images/s", "baseline", "images/s",
                       "speed-up"], loader_rows)
    text = (f"CPU, torch threads = {args.threads}, seed 0, SGD Nesterov, cosine schedule.\n\n"
            f"Training:\n\n{train_md}\n\nLoading:\n\n{data_md}\n\n"
            f"DataLoader throughput:\n\n{loader_md}")
    print(text)
    if not args.no_record:
        from _record import record

        command = ".venv/bin/python benchmarks/training_data.py" + " ".join(
            [""] + [a for a in sys.argv[1:] if a != "--no-record"])
        record("Training loop and datasets", text, command)


if __name__ == "__main__":
    main()
