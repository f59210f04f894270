"""Ship a layer dense where its factorized form runs slower in the serving runtime
(``rankopt export --keep-faster`` and ``rankopt pick --keep-faster``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

__all__ = ["Densified", "densify_slower"]


@dataclass
class Densified:
    """A model with its slower factorized layers dense again, the spec it keeps, and why
    each layer went dense."""

    model: nn.Module
    kept: dict[str, Any]
    slower: dict[str, str] = field(default_factory=dict)
    runtime: str = "eager"
    batch: int = 1
    decomposed: int = 0  # how many layers the file decomposed

    def lines(self, done: str = "made dense again") -> list[str]:
        """Each slower layer's reason, then a summary line."""
        return [f"{name}: {why}" for name, why in self.slower.items()] + [
            f"--keep-faster: {len(self.slower)} of {self.decomposed} decomposed layers "
            f"{done} (timed in {self.runtime} at batch {self.batch})"
        ]


def densify_slower(model: nn.Module, model_file: Path, payload: Mapping[str, Any], input_shape: Sequence[int], *,
                   runtime: str, batch: int, threads: int = 1, rounds: int = 15,
                   allow_modules: Sequence[str] = (), allow_unchecked: bool = False,
                   module_folders: Sequence[str | None] = ()) -> Densified:
    """``model`` (loaded from ``model_file``, whose ``payload`` :func:`read_compressed` gave)
    with the layers that run slower factorized than dense in ``runtime`` made dense again."""
    from rankopt.compression.latency import keep_faster_layers
    from rankopt.compression.surgery import find_layers
    from rankopt.deploy.artifacts import load_base
    from rankopt.deploy.exporting import densify

    base = load_base(model_file, allow_modules=allow_modules, allow_unchecked=allow_unchecked,
                     module_folders=module_folders)
    spec = payload["spec"]
    kept, slower = keep_faster_layers(base, spec, find_layers(base, tuple(input_shape)), batch=batch,
                                      runtime=runtime, threads=threads, repeats=rounds)
    return Densified(densify(model, base, slower) if slower else model, kept, dict(slower), runtime, batch,
                     len(spec))
