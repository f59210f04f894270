"""Sequential (upstream-aware) data-aware decomposition: reduced-rank regression.

Independent calibration (:mod:`rankopt.compression.calibration`) whitens every layer by
the *reference's* inputs ``X``. Once the layers before it are truncated, a layer sees
other inputs ``X'`` and the per-layer errors compound. Sequential calibration (GPTQ,
Frantar et al. 2023; SVD-LLM v2; the reduced-rank regression of Izenman 1975)
compresses the targets in forward order and fits each one to the inputs it actually
receives: with ``X'`` taken from the model whose earlier targets are already
compressed, it chooses the rank-``r`` ``A`` minimising ``||W X - A X'||``:

* ``B = W C_{xx'} C_{x'x'}^-1`` is the unconstrained least-squares map, and
  ``||W X - A X'||^2 = ||W X - B X'||^2 + ||(B - A) L'||^2`` with ``L' L'^T = C_{x'x'}``;
* so ``A = [B L']_r L'^-1``: the existing whitened truncation, applied to ``B`` with the
  statistics of ``X'`` (the decomposers are unchanged; they are handed a stand-in module
  whose weight is ``B``).

Choices the papers leave open (documented here, damping a parameter):

* ``B`` is the ridge regression *towards W*, ``B = W (C_{xx'} + l I)(C_{x'x'} + l I)^-1``
  with ``l = ridge * mean(diag C_{x'x'})``: it stays finite for dead channels and is
  exactly ``W`` when ``X' = X`` (the first target, or everything upstream at full rank),
  so full rank stays exact. ``ridge`` defaults to 0.1, not the whitening's 0.01: a
  Linear's regression has as many unknowns per output as input features and only one
  sample per image, and at 0.01 it overfits 512 images (LeNet-5 fc1, 400 features:
  MNIST validation accuracy at 2x/4x svd 0.9840/0.9780 at 0.01, 0.9846/0.9794 at 0.1,
  0.9848/0.9774 at 1; the only values tried).
* A layer with a bias regresses with an intercept (covariances about the means) and gets
  ``b + W mu - A mu'``, the same bias correction as the independent path.
* Tucker-2 and CP see the input-channel analogue: the per-pixel channel regression
  ``x ~ M x'`` gives ``B = W x_1 M^T``; svd on a conv regresses the im2col patches.
* Decomposers that do not use statistics (tt, svd with tiles, convs with string
  padding or patches wider than :data:`~rankopt.compression.calibration.MAX_PATCH_DIM`)
  are built from the original layer, as without calibration.

Cost: one forward pass per target over the calibration images through both models
(stopped at the target), on top of the independent statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankopt.compression.calibration import (
    ATTRIBUTE,
    DEFAULT_DAMPING,
    MAX_PATCH_DIM,
    InputStatistics,
    input_statistics,
)
from rankopt.compression.calibration_images import DEFAULT_RIDGE, detach_images
from rankopt.core.errors import ConfigError

__all__ = ["fit_in_forward_order", "paired_moments", "regression_stand_in"]

class _Stop(Exception):
    """Raised by a hook once the target's input is captured: the rest of the forward is not needed."""


# -- which statistics a decomposer uses ---------------------------------------------------


def _kind(dec_name: str, module: nn.Module, options: Mapping[str, Any] | None) -> str | None:
    if dec_name == "svd":
        if (options or {}).get("tiles") is not None:
            return None
        if isinstance(module, nn.Conv2d):
            if isinstance(module.padding, str):
                return None
            k = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            return "patch" if k <= MAX_PATCH_DIM and module.groups == 1 else None
        return "channel" if isinstance(module, nn.Linear) else None
    if dec_name in ("tucker2", "cp") and isinstance(module, nn.Conv2d):
        return "channel"
    return None


def _rows(module: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "patch":
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation,  # type: ignore[arg-type]
                        padding=module.padding, stride=module.stride)  # type: ignore[arg-type]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(module, nn.Conv2d):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _capture(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input ``model``'s submodule ``name`` receives on ``x`` (forward stopped there)."""
    box: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
        box.append(inputs[0].detach())
        raise _Stop

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise ConfigError(f"layer {name!r} was not called in the forward pass: it cannot be calibrated")
    return box[0]


def paired_moments(
    reference: nn.Module, current: nn.Module, name: str, kinds: Sequence[str], images: torch.Tensor,
    batch: int = 128,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per kind, ``C_{x'x'}``, ``C_{xx'}``, ``mu_x``, ``mu_x'`` (float64, CPU) of layer
    ``name``'s inputs in ``reference`` (``x``) and ``current`` (``x'``) over ``images``."""
    device = next((p.device for p in current.parameters()), torch.device("cpu"))
    ref_module = reference.get_submodule(name)
    sums: dict[str, dict[str, Any]] = {k: {"xx": None, "cross": None, "mu_x": None, "mu_xp": None, "n": 0}
                                       for k in kinds}
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            x_in = images[start:start + batch].to(device)
            x_ref, x_cur = _capture(reference, name, x_in), _capture(current, name, x_in)
            for kind, out in sums.items():
                x = _rows(ref_module, x_ref, kind).to(torch.float32)
                xp = _rows(ref_module, x_cur, kind).to(torch.float32)
                for key, value in (("xx", xp.T @ xp), ("cross", x.T @ xp),
                                   ("mu_x", x.sum(0)), ("mu_xp", xp.sum(0))):
                    value = value.to(device="cpu", dtype=torch.float64)
                    out[key] = value if out[key] is None else out[key] + value
                out["n"] += x.shape[0]
    return {kind: {key: out[key] / max(out["n"], 1) for key in ("xx", "cross", "mu_x", "mu_xp")}
            for kind, out in sums.items()}


def regression_stand_in(
    module: nn.Module, kind: str, moments: Mapping[str, Mapping[str, torch.Tensor]],
    damping: float = DEFAULT_DAMPING, spectra: str = "output", ridge: float = DEFAULT_RIDGE,
) -> nn.Module:
    """A copy of ``module`` whose weight is the ridge regression ``B`` of its reference output
    on the inputs ``x'`` and which carries ``x'``'s ``kind`` statistics: decomposing it
    truncates ``[B L']_r L'^-1`` (module docstring). ``moments`` (:func:`paired_moments`)
    by kind; with ``patch`` moments present, ``B`` is regressed on the im2col patches even
    when the truncation whitens the channel mode (the better least-squares map)."""
    weight = module.weight.detach().to(torch.float64)  # type: ignore[union-attr]
    new, shift = _regressed(module, weight, "patch" if "patch" in moments else kind, moments, ridge)
    if new is None:
        return module  # a degenerate regression: keep the layer's own weight
    stand_in = copy.deepcopy(module)
    with torch.no_grad():
        stand_in.weight.copy_(new.to(stand_in.weight.dtype))  # type: ignore[union-attr, operator]
        if shift is not None:
            stand_in.bias.add_(shift.to(stand_in.bias.dtype))  # type: ignore[union-attr, operator]
    own = moments[kind]
    stats = InputStatistics(samples=1, damping=damping, spectra=spectra)
    if kind == "patch":
        stats.patch, stats.patch_mean = own["xx"], own["mu_xp"]
    else:
        stats.channel, stats.channel_mean = own["xx"], own["mu_xp"]
    object.__setattr__(stand_in, ATTRIBUTE, stats)
    return stand_in


def _regressed(
    module: nn.Module, weight: torch.Tensor, kind: str, all_moments: Mapping[str, Mapping[str, torch.Tensor]],
    ridge: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(B, bias shift)`` of the ridge regression on ``kind`` rows (None if not finite)."""
    moments = all_moments[kind]
    has_bias = getattr(module, "bias", None) is not None
    c, cross = moments["xx"], moments["cross"]
    mu_x, mu_xp = moments["mu_x"], moments["mu_xp"]
    if has_bias:  # regression with an intercept: covariances about the means
        c = c - torch.outer(mu_xp, mu_xp)
        cross = cross - torch.outer(mu_x, mu_xp)
    scale = float(torch.diagonal(c).mean())
    lam = ridge * (scale if scale > 0.0 else 1.0)
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    # M = (C_xx' + l I)(C_x'x' + l I)^-1, by a solve (the damped C_x'x' is symmetric)
    mix = torch.linalg.solve(c + lam * eye, (cross + lam * eye).T).T
    if kind == "patch" or weight.dim() == 2:
        mat = weight.reshape(weight.shape[0], -1)
        new = (mat @ mix).reshape(weight.shape)
        shift = mat @ mu_x - mat @ mix @ mu_xp
    else:  # per-pixel channel regression on every tap of the kernel
        new = torch.einsum("tshw,sj->tjhw", weight, mix)
        taps = weight.sum(dim=(2, 3))
        shift = taps @ mu_x - new.sum(dim=(2, 3)) @ mu_xp
    if not (bool(torch.isfinite(new).all()) and bool(torch.isfinite(shift).all())):
        return None, None
    return new, (shift if has_bias else None)


def _forward_order(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, _i, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n in names if n not in order]


def fit_in_forward_order(
    target: nn.Module,
    spec: Mapping[str, Mapping[str, Any]],
    images: torch.Tensor,
    compress_layer: Callable[[nn.Module, str, Mapping[str, Any]], None],
    *,
    damping: float | None = None,
    ridge: float = DEFAULT_RIDGE,
    spectra: str = "output",
    batch: int = 128,
) -> None:
    """Compress ``target`` in place, layer by layer in forward order, each data-aware layer
    fitted to the inputs the already compressed layers before it give it (reduced-rank
    regression; module docstring). ``rankopt.compress`` calls this for a model carrying
    calibration images (:mod:`rankopt.compression.calibration_images`), after validating
    the whole spec; ``compress_layer(model, name, entry)`` replaces one layer in place.

    ``damping``: the whitening damping of the truncation (default: the one the layer's
    independent statistics carry, else 0.01); ``ridge``: the regression's shrinkage
    towards ``W`` (module docstring).
    """
    if images.shape[0] < 1:
        raise ConfigError("sequential calibration needs at least one image")
    detach_images(target)  # the per-layer compress calls below must not recurse
    reference = copy.deepcopy(target).eval()
    was_training = target.training
    target.eval()
    device = next((p.device for p in target.parameters()), torch.device("cpu"))
    try:
        order = _forward_order(reference, list(spec), images[:1].to(device))
        for name in order:
            entry = spec[name]
            original = target.get_submodule(name)
            kind = _kind(entry["decomposer"], original, entry.get("options"))
            if kind is not None:
                own = input_statistics(original)
                damp = damping if damping is not None else (own.damping if own is not None else DEFAULT_DAMPING)
                kinds = [kind]
                if kind == "channel" and _kind("svd", original, None) == "patch":
                    kinds.append("patch")  # a conv's regression on its patches (regression_stand_in)
                moments = paired_moments(reference, target, name, kinds, images, batch)
                _set(target, name, regression_stand_in(original, kind, moments, damp, spectra, ridge))
            compress_layer(target, name, entry)
    finally:
        target.train(was_training)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
