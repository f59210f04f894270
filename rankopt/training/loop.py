"""The shared training loop, evaluation and seeding used by the study engine and strategies.

One loop serves every strategy: plain fine-tuning, regularized training (an
``extra_loss`` such as NRMF's nuclear norm or ADMM's proximity term), and methods
that act on the weights after each optimizer step (``step_callback``: DeepTwist's
distortion, TDLRT's basis updates). It is written here rather than taken from a
training library (Lightning, Ignite) because those would own the loop, the device
placement and the checkpointing that the study engine needs to control per trial.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from rankopt.training.devices import module_device, resolve_device
from rankopt.core.errors import ConfigError, TrainingDivergedError
from rankopt.core.types import TrainResult

if TYPE_CHECKING:  # annotations only
    from rankopt.training.distill import Distillation

__all__ = [
    "TrainResult",
    "ProgressCallback",
    "OPTIMIZERS",
    "SCHEDULES",
    "make_loader",
    "train",
    "evaluate",
    "check_train_options",
    "seed_everything",
]

ProgressCallback = Callable[[int, int, float], None]
"""Called after every step with ``(step, total_steps, loss)``; ``step`` is 1-based."""

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
SCHEDULES: tuple[str, ...] = ("cosine", "step", "constant")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and all CUDA devices) random generators.

    This makes CPU runs bit-reproducible. It does not switch on
    ``torch.use_deterministic_algorithms``, which is process-global and slows GPUs;
    set it yourself where you need bit-exact CUDA runs.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an integer, got {seed!r} of type {type(seed).__name__}")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive the others from it
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int | None = None,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over ``dataset``.

    With ``seed`` the shuffling order is fixed by its own generator (independent of
    the global RNG); without it the order follows torch's global RNG, so
    :func:`seed_everything` makes it reproducible.
    """
    _check_int("batch_size", batch_size, minimum=1)
    _check_int("num_workers", num_workers, minimum=0)
    generator = None
    if seed is not None:
        _check_int("seed", seed, minimum=0)
        generator = torch.Generator().manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def train(
    model: nn.Module,
    loader: DataLoader,
    *,
    epochs: float,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    step_size: float = 30,
    gamma: float = 0.1,
    device: str | torch.device | None = None,
    amp: bool = True,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    step_callback: Callable[[nn.Module, int], None] | None = None,
    params: Iterable[nn.Parameter] | None = None,
    seed: int | None = None,
    grad_clip: float | None = None,
    progress: ProgressCallback | None = None,
    max_steps: int | None = None,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    distill: Distillation | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``loader`` with cross-entropy and return what it did.

    Args:
        epochs: passes over ``loader``; fractional values run that share of the
            batches (``0.5`` runs ``round(0.5 * len(loader))`` steps, at least one);
            ``0`` returns at once.
        lr: the initial learning rate.
        optimizer: ``"sgd"`` (with ``momentum``, Nesterov when momentum > 0) or ``"adam"``
            (``momentum`` is then beta1). ``weight_decay`` is L2 on every optimized
            parameter (coupled, as in torch's SGD/Adam).
        schedule: ``"cosine"`` (annealed to 0 over all steps), ``"step"`` (times
            ``gamma`` every ``step_size`` epochs) or ``"constant"``; updated every step.
        device: where to train; ``None`` keeps the model's current device, else the
            model is moved there (``"auto"`` picks CUDA when available).
        amp: mixed precision on CUDA (bfloat16 where supported, else float16 with a
            gradient scaler); ignored on CPU. ``extra_loss`` is computed outside
            autocast, in the parameters' own precision.
        extra_loss: ``f(model) -> scalar`` added to the task loss every step.
        step_callback: ``f(model, step)`` after each optimizer step (``step`` 1-based).
        params: optimize only these (default: every parameter with ``requires_grad``).
        seed: :func:`seed_everything` first, for reproducible shuffling, dropout and
            augmentation (the model's initialization happened before: seed that too).
        grad_clip: clip the gradients' global L2 norm to this value.
        progress: ``f(step, total_steps, loss)`` after every step.
        max_steps: stop after this many steps even if ``epochs`` asks for more.
        criterion: the task loss ``f(logits, labels)``; default cross-entropy.
        distill: knowledge distillation from a teacher (:class:`rankopt.training.distill.Distillation`):
            the task loss becomes the distillation loss built on ``criterion``.

    Raises:
        ConfigError: a bad argument, before any work.
        TrainingDivergedError: the loss became NaN or infinite; training stops at once.
    """
    _check_number("epochs", epochs, minimum=0.0)
    _check_number("lr", lr, minimum=0.0)
    check_train_options(
        optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
        step_size=step_size, gamma=gamma, grad_clip=grad_clip, max_steps=max_steps,
    )
    if not isinstance(loader, DataLoader):
        raise ConfigError(
            f"loader must be a torch DataLoader, got {type(loader).__name__}; "
            "wrap a dataset with rankopt.training.loop.make_loader(dataset, batch_size=..., shuffle=True)"
        )
    batches_per_epoch = len(loader)
    if batches_per_epoch == 0 and epochs > 0:
        raise ConfigError(
            "the training loader yields no batches (empty dataset, or drop_last with fewer "
            "samples than batch_size); give it data or a smaller batch_size"
        )
    total = 0 if epochs == 0 else max(1, round(epochs * batches_per_epoch))
    if max_steps is not None:
        total = min(total, max_steps)
    if total == 0:
        return TrainResult(steps=0, epochs=0.0, final_loss=float("nan"), losses=[], seconds=0.0)

    dev = module_device(model) if device is None else resolve_device(device)
    model.to(dev)
    trainable = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not trainable:
        raise ConfigError(
            "there are no trainable parameters to optimize (all have requires_grad=False, "
            "or `params` is empty); unfreeze some, or pass the ones to train in `params`"
        )
    if seed is not None:
        seed_everything(seed)
    opt = _make_optimizer(optimizer, trainable, lr, momentum, weight_decay)
    sched = _make_schedule(schedule, opt, total, step_size, gamma, batches_per_epoch)
    criterion = criterion or F.cross_entropy

    use_amp = amp and dev.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None

    was_training = model.training
    model.train()
    if distill is not None:
        distill.teacher.to(dev)
        distill.attach(model)
    losses: list[float] = []
    lrs: list[float] = []
    epoch_sum, epoch_n = 0.0, 0
    step = 0
    last = float("nan")
    start = time.perf_counter()
    try:
        while step < total:
            for inputs, targets in loader:
                inputs = inputs.to(dev, non_blocking=True)
                targets = targets.to(dev, non_blocking=True)
                autocast = (
                    torch.autocast(device_type="cuda", dtype=amp_dtype) if use_amp else nullcontext()
                )
                with autocast:
                    outputs = model(inputs)
                    task = (criterion(outputs, targets) if distill is None
                            else distill.loss(inputs, outputs, targets, criterion))
                loss = task.float()
                extra = None
                if extra_loss is not None:
                    extra = extra_loss(model)
                    loss = loss + extra
                value = float(loss.detach())
                if epoch_n == 0:
                    lrs.append(float(opt.param_groups[0]["lr"]))
                if not math.isfinite(value):
                    raise TrainingDivergedError(
                        _diverged_message(step + 1, total, value, float(task.detach()), extra, lr)
                    )
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if grad_clip is not None:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
                    opt.step()
                sched.step()
                step += 1
                last = value
                epoch_sum += value
                epoch_n += 1
                if step_callback is not None:
                    step_callback(model, step)
                if progress is not None:
                    progress(step, total, value)
                if step % batches_per_epoch == 0:
                    losses.append(epoch_sum / epoch_n)
                    epoch_sum, epoch_n = 0.0, 0
                if step >= total:
                    break
    finally:
        model.train(was_training)
        if distill is not None:
            distill.detach()
    if epoch_n:
        losses.append(epoch_sum / epoch_n)
    return TrainResult(
        steps=step,
        epochs=step / batches_per_epoch,
        final_loss=last,
        losses=losses,
        seconds=time.perf_counter() - start,
        lrs=lrs,
    )


@torch.no_grad()
def check_train_options(
    *,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    step_size: float = 30,
    gamma: float = 0.1,
    amp: bool = True,
    grad_clip: float | None = None,
    max_steps: int | None = None,
) -> None:
    """Check :func:`train`'s options (study files check their ``train:`` block with it)."""
    _check_number("momentum", momentum, minimum=0.0, below=1.0)
    _check_number("weight_decay", weight_decay, minimum=0.0)
    _check_number("step_size", step_size, minimum=0.0, strict=True)
    _check_number("gamma", gamma, minimum=0.0, strict=True)
    if optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {optimizer!r}"
        )
    if schedule not in SCHEDULES:
        raise ConfigError(
            f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, got {schedule!r}"
        )
    if grad_clip is not None:
        _check_number("grad_clip", grad_clip, minimum=0.0, strict=True)
    if max_steps is not None:
        _check_int("max_steps", max_steps, minimum=0)
    if not isinstance(amp, bool):
        raise ConfigError(f"amp must be true or false, got {amp!r}")


def evaluate(
    model: nn.Module, loader: DataLoader, *, device: str | torch.device | None = None
) -> float:
    """Top-1 accuracy of ``model`` on ``loader``, in [0, 1].

    Runs in eval mode and restores the model's train/eval mode afterwards.
    ``device=None`` evaluates where the model is; otherwise the model is moved there.
    """
    dev = module_device(model) if device is None else resolve_device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    correct = 0
    seen = 0
    try:
        for inputs, targets in loader:
            inputs = inputs.to(dev, non_blocking=True)
            targets = targets.to(dev, non_blocking=True)
            predicted = model(inputs).argmax(dim=1)
            correct += int((predicted == targets).sum())
            seen += int(targets.numel())
    finally:
        model.train(was_training)
    if seen == 0:
        raise ConfigError(
            "the evaluation loader yields no samples; give evaluate() a non-empty dataset"
        )
    return correct / seen


# -- helpers -------------------------------------------------------------------------


def _make_optimizer(
    name: str, params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
        )
    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


def _make_schedule(
    name: str,
    opt: torch.optim.Optimizer,
    total_steps: int,
    step_size: float,
    gamma: float,
    batches_per_epoch: int,
) -> torch.optim.lr_scheduler.LRScheduler:
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    if name == "step":
        every = max(1, round(step_size * batches_per_epoch))
        return torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=gamma)
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


def _diverged_message(
    step: int, total: int, value: float, task: float, extra: Any, lr: float
) -> str:
    parts = f"task loss {task}"
    if extra is not None:
        parts += f", extra_loss {float(extra.detach()) if torch.is_tensor(extra) else extra}"
    return (
        f"training diverged: the loss became {value} at step {step} of {total} ({parts}); "
        f"the learning rate lr={lr} is probably too high: lower it (e.g. by 10x), "
        "set grad_clip, or reduce the weight of the regularization term"
    )


def _check_number(
    name: str,
    value: Any,
    *,
    minimum: float,
    below: float | None = None,
    strict: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    v = float(value)
    bad = not math.isfinite(v) or (v <= minimum if strict else v < minimum)
    if below is not None and v >= below:
        bad = True
    if bad:
        rule = f"{'>' if strict else '>='} {minimum:g}"
        if below is not None:
            rule += f" and < {below:g}"
        raise ConfigError(f"{name} must be a finite number {rule}, got {value!r}")


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
