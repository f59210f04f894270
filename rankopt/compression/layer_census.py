"""Which layers of a model can be compressed, which are refused and which are skipped, and why.

:func:`rankopt.find_layers` lists the Conv2d and Linear layers (attention projections
included) that the forward pass reaches. The census sorts every weight layer of the
model into three groups:

- compressible: listed, and at least one of the decomposers takes it;
- refused: listed, but no decomposer takes it (grouped/depthwise convolutions, a weight
  tied to another module's), with the decomposer's reason;
- skipped: never listed: a layer type no decomposer handles (Conv1d, Embedding, ...), a
  Conv2d/Linear the forward pass never calls (unused in eval mode, such as an auxiliary
  head, or read directly by a parent that rankopt does not know), or one excluded by the
  include/exclude patterns.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from rankopt.compression.surgery import COMPRESSIBLE_TYPES, _matches, _shared_owner, find_layers, modularized_copy
from rankopt.compression.attention import needs_modularizing

__all__ = ["DEFAULT_CENSUS_DECOMPOSERS", "LayerCensus", "layer_census"]

DEFAULT_CENSUS_DECOMPOSERS: tuple[str, ...] = ("tucker2", "svd")  # a study's default decomposers
# weight layers that no built-in decomposer handles, reported as skipped rather than ignored
OTHER_WEIGHT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding, nn.EmbeddingBag, nn.Bilinear,
)


@dataclass(frozen=True)
class LayerCensus:
    """The model's weight layers sorted into compressible, refused and skipped, with reasons."""

    compressible: tuple[str, ...]
    refused: dict[str, str] = field(default_factory=dict)  # layer -> why no decomposer takes it
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it is not listed
    decomposers: tuple[str, ...] = DEFAULT_CENSUS_DECOMPOSERS

    @property
    def listed(self) -> int:
        """Layers find_layers lists: compressible plus refused."""
        return len(self.compressible) + len(self.refused)

    @staticmethod
    def _by_reason(reasons: dict[str, str]) -> dict[str, int]:
        return dict(collections.Counter(reasons.values()).most_common())

    def refused_by_reason(self) -> dict[str, int]:
        return self._by_reason(self.refused)

    def skipped_by_reason(self) -> dict[str, int]:
        return self._by_reason(self.skipped)

    def summary(self) -> str:
        """``"49 compressible, 12 refused (grouped/depthwise ... x12), 0 skipped"``."""

        def part(n: int, label: str, counts: dict[str, int]) -> str:
            why = "; ".join(f"{reason} x{k}" for reason, k in counts.items())
            return f"{n} {label}" + (f" ({why})" if why else "")

        return ", ".join([
            f"{len(self.compressible)} compressible",
            part(len(self.refused), "refused", self.refused_by_reason()),
            part(len(self.skipped), "skipped", self.skipped_by_reason()),
        ])

    def as_dict(self) -> dict[str, Any]:
        return {
            "decomposers": list(self.decomposers),
            "compressible": len(self.compressible),
            "refused": dict(self.refused),
            "skipped": dict(self.skipped),
        }


def _refusal(module: nn.Module, decomposers: Sequence[Any]) -> str | None:
    """None when some decomposer takes ``module``, else the reason of one that knows its type."""
    reasons = []
    for dec in decomposers:
        why = dec.unsupported_reason(module)
        if why is None:
            return None
        reasons.append((not isinstance(module, dec.module_types), why))
    reasons.sort(key=lambda r: r[0])  # a decomposer of the module's type explains best
    return reasons[0][1]


def _short(reason: str) -> str:
    """A reason without its per-layer values, so that reasons group: 'groups=32' -> 'groups>1'."""
    if reason.startswith("grouped/depthwise convolution"):
        return "grouped/depthwise convolution (groups > 1)"
    return reason


def layer_census(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    decomposers: Sequence[str] = DEFAULT_CENSUS_DECOMPOSERS,
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> LayerCensus:
    """Sort ``model``'s weight layers into compressible, refused and skipped (see the module doc).

    >>> census = rankopt.layer_census(torchvision.models.mobilenet_v2(), (1, 3, 224, 224))
    >>> census.summary()
    '35 compressible, 17 refused (grouped/depthwise convolution (groups > 1) x17), 0 skipped'
    """
    from rankopt.contract.manager import get_registry

    registry = get_registry()
    decs = [registry.create("decomposers", d) for d in decomposers]
    work = modularized_copy(model) if needs_modularizing(model) else model
    listed = find_layers(work, input_shape, include=include, exclude=exclude)
    names = {layer.name for layer in listed}
    compressible: list[str] = []
    refused: dict[str, str] = {}
    for layer in listed:
        module = work.get_submodule(layer.name)
        owner = _shared_owner(work, layer.name, module)
        why = f"weight tied to another module ({owner})" if owner is not None else _refusal(module, decs)
        if why is None:
            compressible.append(layer.name)
        else:
            refused[layer.name] = _short(why)
    skipped: dict[str, str] = {}
    for name, module in work.named_modules():
        if not name or name in names:
            continue
        if isinstance(module, COMPRESSIBLE_TYPES):
            if not _matches(name, include) or _matches(name, exclude):
                skipped[name] = "excluded by the include/exclude patterns"
            else:
                skipped[name] = (
                    "never called by the forward pass in eval mode (a training-only or unused "
                    "branch, or a parent that reads the weight directly)"
                )
        elif isinstance(module, OTHER_WEIGHT_TYPES):
            skipped[name] = f"{type(module).__name__}: no decomposer for this layer type"
    return LayerCensus(tuple(compressible), refused, skipped, tuple(decomposers))
