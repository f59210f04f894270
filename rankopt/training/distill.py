"""Knowledge distillation from the uncompressed reference while a compressed model trains.

The loss of :func:`rankopt.training.loop.train` with a :class:`Distillation` is (Hinton,
Vinyals and Dean 2015, "Distilling the knowledge in a neural network")::

    (1 - weight) * CE(student, labels)
      + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
      + features * mean over layers of MSE(student output, teacher output)

``T`` (``temperature``) softens both distributions; the ``T^2`` keeps the soft term's
gradients on the scale of the hard term's as ``T`` changes, as the paper prescribes.
The feature term (FitNets-style hints, Romero et al. 2015) matches each compressed
layer's output to the same layer's output in the reference: a compressed layer keeps
its name and output shape, so no adapter is needed. The paper leaves the layers open;
matching only the compressed ones targets exactly where the approximation error enters.

The teacher runs on each batch in ``no_grad`` mode rather than from logits cached once:
with data augmentation (the CIFAR settings) every epoch shows other images, for which
cached logits would be wrong, and a teacher forward costs about a third of a training
step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankopt.core.errors import ConfigError

__all__ = ["Distillation", "distillation_loss", "DISTILL_DEFAULTS", "DISTILL_OFF", "check_distill_params"]

# the hyperparameters every fine-tuning strategy takes, at their defaults: soft targets at
# lambda 0.5, T 4 (Hinton et al.'s range). On by default since they won: +0.004 mean
# (accuracy, params) hypervolume on LeNet-5/MNIST over 3 seeds, +0.007 on ResNet-20/CIFAR
# (benchmarks/RESULTS.md, front quality); distill_weight 0 turns them off
DISTILL_DEFAULTS: dict[str, float] = {
    "distill_weight": 0.5,
    "distill_temperature": 4.0,
    "distill_features": 0.0,
}
# what TrialContext.train does when a call names no distill_* option: plain training (a
# strategy that never heard of distillation keeps training as it did)
DISTILL_OFF: dict[str, float] = {**DISTILL_DEFAULTS, "distill_weight": 0.0}


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    weight: float,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> torch.Tensor:
    """``(1 - weight) * criterion(student, labels) + weight * T^2 * KL(p_teacher || p_student)``
    with both distributions softened by ``T``; KL averaged over the batch."""
    hard = criterion(student, labels)
    if weight == 0:
        return hard
    t = float(temperature)
    soft = F.kl_div(
        F.log_softmax(student.float() / t, dim=1),
        F.log_softmax(teacher.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - weight) * hard + weight * t * t * soft


@dataclass
class Distillation:
    """Distill ``teacher`` (the reference, never trained here) into the model being trained.

    Args:
        teacher: the uncompressed reference; used in eval mode, without gradients.
        weight: lambda in [0, 1], the share of the soft-target term.
        temperature: T > 0.
        features: weight (>= 0) of the feature-matching term.
        layers: the qualified names whose outputs are matched (the compressed layers).
    """

    teacher: nn.Module
    weight: float = 0.5
    temperature: float = 4.0
    features: float = 0.0
    layers: Sequence[str] = field(default_factory=tuple)
    _student_out: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _teacher_out: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _handles: list[Any] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        check_distill_params("train", {
            "distill_weight": self.weight, "distill_temperature": self.temperature,
            "distill_features": self.features,
        })
        if self.features > 0 and not self.layers:
            raise ConfigError(
                "distillation: features > 0 needs the layers to match (the compressed layers' "
                "names); give layers=[...] or set features to 0"
            )

    def attach(self, student: nn.Module) -> None:
        """Start recording the matched layers' outputs (call :meth:`detach` after training)."""
        self.detach()
        self.teacher.eval()
        if self.features <= 0:
            return
        for name in self.layers:
            for model, store in ((student, self._student_out), (self.teacher, self._teacher_out)):
                module = model.get_submodule(name)
                self._handles.append(module.register_forward_hook(_recorder(store, name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._student_out.clear()
        self._teacher_out.clear()

    def loss(
        self,
        inputs: torch.Tensor,
        outputs: torch.Tensor,
        labels: torch.Tensor,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The distillation loss of one batch (the student's forward has run on ``inputs``)."""
        with torch.no_grad():
            teacher = self.teacher(inputs)
        loss = distillation_loss(outputs, teacher, labels, temperature=self.temperature,
                                 weight=self.weight, criterion=criterion)
        if self.features > 0:
            matched = [F.mse_loss(self._student_out[n].float(), self._teacher_out[n].float())
                       for n in self.layers]
            loss = loss + self.features * torch.stack(matched).mean()
        return loss


def _recorder(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        store[name] = output

    return hook


def check_distill_params(owner: str, params: dict[str, Any]) -> None:
    """The distillation hyperparameters' rules, named in a :class:`ConfigError`."""
    rules = (
        ("distill_weight", 0.0, 1.0, "in [0, 1]"),
        ("distill_temperature", None, None, "> 0"),
        ("distill_features", 0.0, None, ">= 0"),
    )
    for key, low, high, rule in rules:
        value = params.get(key, DISTILL_DEFAULTS[key])
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        if ok and key == "distill_temperature":
            ok = value > 0
        if ok and low is not None:
            ok = value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            raise ConfigError(
                f"{owner}: hyperparameter {key!r} must be a number {rule}, got {value!r}"
            )
