"""The committed CIFAR-10 reference (`benchmarks/references/resnet20_cifar10.pt`): check it,
or train it again with the recipe that made it.

    .venv/bin/python benchmarks/train_reference_cifar.py --check          # about a minute
    .venv/bin/python benchmarks/train_reference_cifar.py --train --out W  # about 25 min on 2 cores

Recipe (the committed file's): ResNet-20 (`resnet20_cifar`) on CIFAR-10 batches 1-4
(40,000 images), batch 128, 40 epochs of SGD with Nesterov momentum 0.9, weight decay
5e-4, a one-cycle schedule to lr 0.2 (torch's OneCycleLR), cross-entropy with label
smoothing 0.1, random crop with 4-pixel reflect padding and horizontal flips, inputs
normalized with the training mean/std. Batch 5 (10,000 images) is the validation split;
the 1,000 test images stay held out. Recorded: validation 0.9122, test 0.9030.

The training loop is written out here rather than through `rankopt.training.loop.train`,
which has no one-cycle schedule or reflect padding: the recipe is the reference's own,
not a study's, and it is kept exactly as it ran.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data"
WEIGHTS = HERE / "references" / "resnet20_cifar10.pt"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def load(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        with np.load(DATA / f) as z:
            xs.append(z["x"])
            ys.append(z["y"])
    x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).float().div(255)
    return (x - MEAN) / STD, torch.from_numpy(np.concatenate(ys)).long()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
    return hits / len(x)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    n = x.shape[0]
    dx, dy = torch.randint(0, 9, (2, n), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def train(out: Path, epochs: int, seed: int) -> None:
    import rankopt

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load([f"cifar10_train_{k}.npz" for k in (1, 2, 3, 4)])
    xv, yv = load(["cifar10_train_5.npz"])
    model = rankopt.model("resnet20_cifar", num_classes=10)
    steps = epochs * ((len(x) + 127) // 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(augment(x[idx], g)), y[idx]).backward()
            opt.step()
            sched.step()
        val = accuracy(model, xv, yv)
        print(f"epoch {epoch + 1}/{epochs}: val {val:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "epoch": epochs, "val": val}, out)


def check(path: Path) -> tuple[float, float]:
    import rankopt

    model = rankopt.model("resnet20_cifar", num_classes=10)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    xv, yv = load(["cifar10_train_5.npz"])
    xt, yt = load(["cifar10_test1k.npz"])
    return accuracy(model, xv, yv), accuracy(model, xt, yt)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="evaluate the weights file")
    parser.add_argument("--train", action="store_true", help="train the reference again")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (DATA / "cifar10_train_5.npz").is_file():
        print(f"skipped: the CIFAR-10 archives are not in {DATA}", file=sys.stderr)
        return 0
    if args.train:
        train(args.out, args.epochs, args.seed)
    val, test = check(args.out)
    print(f"{args.out}: validation (batch 5, 10,000 images) {val:.4f}, test (1,000 images) {test:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
