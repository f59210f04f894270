"""Data-aware decomposition: each target layer's input statistics (calibration).

All decomposers minimise the error of a layer's *weight*; what a network feels is the
error of the layer's *output* on the inputs it actually sees. With the second moment
``C = E[x x^T]`` of a layer's input vectors, the output error of a weight change
``dW`` is ``E||dW x||^2 = ||dW L||_F^2`` for any ``L`` with ``L L^T = C``. So the
rank-``r`` matrix that minimises the output error is ``[W L]_r L^-1``: truncate the
*whitened* weight ``W L``, then undo the whitening (SVD-LLM, Wang et al. 2024; ASVD,
Yuan et al. 2023 use a diagonal scaling of the same idea). At full rank it is exact,
whatever ``C``.

What "input vector" means per decomposer:

* ``svd`` on a Linear: the layer's input features (leading dims flattened, so tokens
  count as samples); on a Conv2d (lowered as ``T x S*kh*kw``): the im2col patches,
  ``patch`` statistics.
* ``tucker2`` and ``cp`` whiten the input-channel mode only (``channel`` statistics,
  the per-pixel ``S x S`` second moment): ``W' = W x_1 L^T``, decompose ``W'``, then map
  the input factor back with ``L^-T``. The spatial correlations inside a patch are not
  modelled; that is the Tucker-2 analogue the core's ``kh x kw`` kernel leaves room for.

The statistics ride on the module itself (attribute :data:`ATTRIBUTE`, not a buffer, so
they are never saved in a state_dict) and survive ``copy.deepcopy``, so a study
collects them once on its reference and every trial's copy carries them. Decomposers
and the spectrum-reading selectors use them whenever a module carries them; detach
them (:func:`detach_statistics`) for the plain weight-space behaviour.

The second moment is taken about zero (not centred): the error of ``dW x`` involves
the mean of ``x`` too. The whitening is damped, ``C + damping * mean(diag C) * I``, so
dead ReLU channels and zero padding (rank-deficient ``C``) stay invertible; damping
only changes how truncated ranks are chosen, never the full-rank result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from rankopt.core.errors import ConfigError

__all__ = [
    "ATTRIBUTE",
    "DEFAULT_DAMPING",
    "InputStatistics",
    "attach_statistics",
    "calibrate",
    "collect_input_statistics",
    "channel_whitened_matrices",
    "correct_bias",
    "detach_statistics",
    "input_statistics",
    "unwhiten_input_factor",
    "whiten_columns",
    "whiten_input_channels",
    "whitened",
    "load_statistics",
    "save_statistics",
    "statistics_key",
]

ATTRIBUTE = "_rankopt_input_statistics"
DEFAULT_DAMPING = 0.01
KINDS = ("channel", "patch")
# second moments above this many entries (a 4096-wide patch) would cost more memory
# than they save accuracy; such layers stay weight-space for the patch kind
MAX_PATCH_DIM = 4608


@dataclass
class InputStatistics:
    """Second moments ``E[x x^T]`` (float64, CPU) of one layer's input vectors.

    ``channel``: ``(S, S)``, per pixel of a conv's input (or a Linear's features);
    ``patch``: ``(S*kh*kw, S*kh*kw)`` of a conv's im2col patches (None when not
    collected). ``samples``: the vectors averaged. ``damping`` is used by
    :meth:`whitening`. ``spectra``: ``"output"`` (selectors read the whitened
    spectrum) or ``"weight"`` (the weight's own).
    """

    channel: torch.Tensor | None = None
    patch: torch.Tensor | None = None
    samples: int = 0
    damping: float = DEFAULT_DAMPING
    spectra: str = "output"
    channel_mean: torch.Tensor | None = None
    patch_mean: torch.Tensor | None = None
    _factors: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def moment(self, kind: str) -> torch.Tensor | None:
        if kind not in KINDS:
            raise ValueError(f"statistics kind must be one of {list(KINDS)}, got {kind!r}")
        return self.channel if kind == "channel" else self.patch

    def mean(self, kind: str) -> torch.Tensor | None:
        return self.channel_mean if kind == "channel" else self.patch_mean

    def whitening(self, kind: str, centered: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(L, L^-1)``, float64 on the CPU, with ``L L^T`` the damped moment (the
        covariance about the mean when ``centered``); None if absent."""
        if (kind, centered) in self._factors:
            return self._factors[(kind, centered)]
        c = self.moment(kind)
        mean = self.mean(kind)
        if c is None or (centered and mean is None):
            return None
        c = c.to(torch.float64)
        if centered:
            c = c - torch.outer(mean, mean)
        scale = float(torch.diagonal(c).mean())
        if not scale > 0.0:  # an all-zero input: nothing to weight by
            scale = 1.0
        damped = c + (self.damping * scale) * torch.eye(c.shape[0], dtype=torch.float64)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) != 0:  # not positive definite even damped (NaN input): stay plain
            return None
        inverse = torch.linalg.solve_triangular(
            lower, torch.eye(c.shape[0], dtype=torch.float64), upper=False
        )
        self._factors[(kind, centered)] = (lower, inverse)
        return self._factors[(kind, centered)]

    def __deepcopy__(self, memo: dict[int, Any]) -> InputStatistics:
        return self  # read-only once collected: every trial's copy shares one


def input_statistics(module: nn.Module) -> InputStatistics | None:
    """The statistics a module carries (:func:`attach_statistics`), or None."""
    stats = module.__dict__.get(ATTRIBUTE)
    return stats if isinstance(stats, InputStatistics) else None


def attach_statistics(model: nn.Module, stats: Mapping[str, InputStatistics]) -> None:
    """Let the named submodules of ``model`` carry their statistics."""
    for name, value in stats.items():
        object.__setattr__(model.get_submodule(name), ATTRIBUTE, value)


def detach_statistics(model: nn.Module) -> None:
    """Remove every module's statistics (and sequential calibration's images):
    decomposers go back to weight space."""
    from rankopt.compression.calibration_images import MODES_ATTRIBUTE

    for module in model.modules():
        module.__dict__.pop(ATTRIBUTE, None)
        module.__dict__.pop(MODES_ATTRIBUTE, None)


def whitened(
    module: nn.Module, kind: str, like: torch.Tensor, *, for_selection: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(L, L^-1)`` for ``module``'s ``kind`` statistics on ``like``'s device and dtype,
    or None (weight space: no statistics, or selectors told to read the weight's own).

    A layer with a bias is whitened by its inputs' covariance about their mean: the
    mean's share of the error is then removed exactly by :func:`corrected_bias`. A
    layer without one (a conv before BatchNorm) by the second moment about zero, since
    nothing can absorb a mean shift there.
    """
    stats = input_statistics(module)
    if stats is None or (for_selection and stats.spectra != "output"):
        return None
    pair = stats.whitening(kind, centered=_centered(module, stats, kind))
    if pair is None:
        return None
    return pair[0].to(device=like.device, dtype=like.dtype), pair[1].to(device=like.device, dtype=like.dtype)


def _centered(module: nn.Module, stats: InputStatistics, kind: str) -> bool:
    return getattr(module, "bias", None) is not None and stats.mean(kind) is not None


def correct_bias(built_bias: torch.Tensor | None, module: nn.Module, approx: torch.Tensor, kind: str) -> None:
    """Add to ``built_bias`` the output shift the truncation makes at the inputs' mean,
    ``(W - W') mu``, for a layer decomposed with centered whitening (:func:`whitened`);
    a no-op otherwise. ``approx`` is ``W'`` in the weight's own shape."""
    stats = input_statistics(module)
    if built_bias is None or stats is None or not _centered(module, stats, kind):
        return
    weight = module.weight.detach().to(torch.float64)  # type: ignore[union-attr]
    delta = weight - approx.detach().to(device=weight.device, dtype=torch.float64)
    mean = stats.mean(kind).to(weight.device)  # type: ignore[union-attr]
    if kind == "channel" and delta.dim() == 4:  # per-pixel channel mean: sum the kernel's taps
        shift = delta.sum(dim=(2, 3)) @ mean
    else:
        shift = delta.reshape(delta.shape[0], -1) @ mean
    with torch.no_grad():
        built_bias.add_(shift.to(built_bias.dtype))


def channel_whitened_matrices(
    module: nn.Module, rank_matrices: Any, options: Mapping[str, Any] | None = None
) -> list[torch.Tensor] | None:
    """``rank_matrices`` (a decomposer's) of the kernel with its input channels whitened,
    when ``module`` carries statistics the selectors read; else None."""
    w = module.weight.detach().to(torch.float64)  # type: ignore[union-attr]
    white = whitened(module, "channel", w, for_selection=True)
    return None if white is None else rank_matrices(whiten_input_channels(w, white[0]), options)


def whiten_input_channels(weight: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``W x_1 L^T`` of a conv kernel ``(T, S, kh, kw)``: its input-channel mode whitened."""
    _check_width(lower, weight.shape[1], "input channels")
    return torch.einsum("tshw,sj->tjhw", weight, lower)


def unwhiten_input_factor(factor: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``L^-T U``: an input-channel factor ``(S, r)`` found on the whitened kernel, mapped
    back so that ``W ~ core x_1 (L^-T U)``."""
    return inverse.T @ factor


def whiten_columns(matrix: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``M L``: a ``(rows, n)`` matrix acting on inputs whose second moment is ``L L^T``."""
    _check_width(lower, matrix.shape[1], "input features")
    return matrix @ lower


def _check_width(lower: torch.Tensor, width: int, what: str) -> None:
    if lower.shape[0] != width:
        raise ConfigError(
            f"input statistics of width {lower.shape[0]} do not fit a layer with {width} {what}; "
            "they were collected on another model: detach them (rankopt.compression.calibration."
            "detach_statistics) or calibrate again"
        )


# -- collecting ---------------------------------------------------------------------------


class _Accumulator:
    def __init__(self, want_patch: bool) -> None:
        self.want_patch = want_patch
        self.channel: torch.Tensor | None = None
        self.patch: torch.Tensor | None = None
        self.channel_sum: torch.Tensor | None = None
        self.patch_sum: torch.Tensor | None = None
        self.samples = 0
        self.patch_samples = 0

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach()
        if isinstance(module, nn.Conv2d):
            chan = x.movedim(1, -1).reshape(-1, x.shape[1])
        else:
            chan = x.reshape(-1, x.shape[-1])
        self.channel = _add(self.channel, chan)
        self.channel_sum = _sum(self.channel_sum, chan)
        self.samples += chan.shape[0]
        if self.want_patch and isinstance(module, nn.Conv2d):
            if isinstance(module.padding, str):
                return  # 'same'/'valid' padding: no fixed im2col; stays weight space
            cols = F.unfold(x, module.kernel_size, dilation=module.dilation,
                            padding=module.padding, stride=module.stride)  # (N, S*k*k, L)
            rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            self.patch = _add(self.patch, rows)
            self.patch_sum = _sum(self.patch_sum, rows)
            self.patch_samples += rows.shape[0]

    def result(self, damping: float, spectra: str) -> InputStatistics:
        n, p = max(self.samples, 1), self.patch_samples
        have_patch = self.patch is not None and p > 0
        return InputStatistics(
            self.channel / n if self.channel is not None else None,
            self.patch / p if have_patch else None,
            self.samples, damping=damping, spectra=spectra,
            channel_mean=self.channel_sum / n if self.channel_sum is not None else None,
            patch_mean=self.patch_sum / p if have_patch and self.patch_sum is not None else None,
        )


def _sum(total: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    column = rows.to(torch.float64).sum(dim=0).cpu()
    return column if total is None else total + column


def _add(total: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    rows = rows.to(torch.float32)
    gram = (rows.T @ rows).to(device="cpu", dtype=torch.float64)
    return gram if total is None else total + gram


def collect_input_statistics(
    model: nn.Module,
    layers: Iterable[str],
    batches: Iterable[Any],
    *,
    images: int = 512,
    patch_layers: Iterable[str] = (),
    damping: float = DEFAULT_DAMPING,
    spectra: str = "output",
    device: torch.device | str | None = None,
) -> dict[str, InputStatistics]:
    """Run ``images`` inputs from ``batches`` through ``model`` (eval mode, no grad)
    and return each named layer's input second moments.

    ``batches`` yields inputs or ``(inputs, targets)`` pairs (a DataLoader). Layers in
    ``patch_layers`` (convs that ``svd`` may lower) also get im2col patch moments, up to
    :data:`MAX_PATCH_DIM` wide.
    """
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ConfigError(f"calibration images must be an integer >= 1, got {images!r}")
    if spectra not in ("output", "weight"):
        raise ConfigError(f"calibration spectra must be 'output' or 'weight', got {spectra!r}")
    names = list(layers)
    patch = set(patch_layers)
    accumulators: dict[str, _Accumulator] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name)
        want = name in patch and isinstance(module, nn.Conv2d) and (
            module.in_channels * module.kernel_size[0] * module.kernel_size[1] <= MAX_PATCH_DIM
        )
        accumulators[name] = _Accumulator(want)
        handles.append(module.register_forward_pre_hook(accumulators[name]))
    was_training = model.training
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x[: images - seen].to(device)
                model(x)
                seen += x.shape[0]
                if seen >= images:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise ConfigError("calibration saw no images: the training split is empty")
    return {name: acc.result(damping, spectra) for name, acc in accumulators.items()}


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    layers: Iterable[str] | None = None,
    *,
    images: int = 512,
    damping: float = DEFAULT_DAMPING,
    spectra: str = "output",
    mode: str = "independent",
    ridge: float = 0.1,
) -> dict[str, InputStatistics]:
    """Collect and attach input statistics for ``layers`` (default: every Conv2d and
    Linear); afterwards ``rankopt.compress``, the decomposers and the selectors work
    data-aware on ``model``. Returns the statistics by layer name.

    ``mode="independent"`` whitens every layer by the reference's own inputs;
    ``"sequential"`` also keeps the calibration images on ``model``, so that
    ``rankopt.compress`` fits the layers in forward order, each to the inputs the
    compressed layers before it give it (reduced-rank regression,
    :mod:`rankopt.compression.sequential`; one forward pass per target more; ``ridge``
    its shrinkage towards the layer's own weight)."""
    from rankopt.compression.calibration_images import attach_images, calibration_images, check_mode, check_ridge

    check_mode(mode)
    check_ridge(ridge)
    if layers is None:
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    layers = list(layers)
    if mode == "sequential":  # the same images feed the statistics and the sequential fit
        batches = [calibration_images(batches, images)]
    stats = collect_input_statistics(model, layers, batches, images=images, patch_layers=layers,
                                     damping=damping, spectra=spectra)
    attach_statistics(model, stats)
    if mode == "sequential":
        attach_images(model, batches[0], damping, ridge)  # type: ignore[index]
    return stats


# -- the study's cache -------------------------------------------------------------------


def statistics_key(reference_key: str, settings: Mapping[str, Any]) -> str:
    """The cache file stem for a reference and the calibration settings."""
    blob = json.dumps({"reference": reference_key, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save_statistics(path: Path, stats: Mapping[str, InputStatistics], *, root: Path | None = None) -> None:
    """Write statistics atomically (``torch.save`` of plain tensors, read back weights-only);
    with ``root`` (the run directory) no link on the way is followed."""
    data = {
        name: {"channel": s.channel, "patch": s.patch, "samples": s.samples,
               "damping": s.damping, "spectra": s.spectra,
               "channel_mean": s.channel_mean, "patch_mean": s.patch_mean}
        for name, s in stats.items()
    }
    import io

    from rankopt.core.safe_paths import atomic_write

    buffer = io.BytesIO()  # serialized first: a full disk is then an OSError, not torch's
    torch.save(data, buffer)
    atomic_write(path, buffer.getvalue(), root=root)


def load_statistics(path: Path, layers: Iterable[str]) -> dict[str, InputStatistics] | None:
    """Statistics saved by :func:`save_statistics` for exactly ``layers``, or None.

    A torn, foreign or damaged file (wrong shapes, non-finite values) is a miss, so it
    is collected again rather than trusted.
    """
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(data, dict) or set(data) != set(layers):
        return None
    out = {}
    for name, entry in data.items():
        try:
            moments = [entry["channel"], entry["patch"]]
            means = [entry["channel_mean"], entry["patch_mean"]]
            for m, mu in zip(moments, means):
                if m is not None and not (
                    isinstance(m, torch.Tensor) and m.dim() == 2 and m.shape[0] == m.shape[1]
                    and m.dtype == torch.float64 and bool(torch.isfinite(m).all())
                ):
                    return None
                if mu is not None and not (
                    m is not None and isinstance(mu, torch.Tensor) and mu.shape == (m.shape[0],)
                    and mu.dtype == torch.float64 and bool(torch.isfinite(mu).all())
                ):
                    return None
            out[name] = InputStatistics(moments[0], moments[1], int(entry["samples"]),
                                        damping=float(entry["damping"]), spectra=str(entry["spectra"]),
                                        channel_mean=means[0], patch_mean=means[1])
        except (KeyError, TypeError, ValueError):
            return None
    return out
