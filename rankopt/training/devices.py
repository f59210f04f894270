"""Choosing the torch device from a config value (``auto`` by default)."""

from __future__ import annotations

import re

import torch

from rankopt.core.errors import ConfigError

__all__ = ["resolve_device", "module_device"]

_CUDA_PATTERN = re.compile(r"^cuda(:\d+)?$")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` a config value names.

    ``"auto"`` (or ``None``) picks ``cuda`` when a GPU is available, else ``cpu``;
    ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"`` name one explicitly. Asking for a
    GPU that is not there is a :class:`~rankopt.core.errors.ConfigError` before any work
    starts, rather than a late CUDA error inside training.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        name = str(device)
    elif isinstance(device, str):
        name = device.strip().lower()
    else:
        raise ConfigError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', "
            f"got {device!r} of type {type(device).__name__}"
        )
    if name == "cpu":
        return torch.device("cpu")
    if _CUDA_PATTERN.match(name):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} was requested but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use device: 'cpu' or 'auto', "
                "or install a CUDA build of torch"
            )
        dev = torch.device(name)
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"device {name!r} was requested but this machine has {count} CUDA "
                f"device(s) (valid indices 0..{count - 1}); pick an index in that range"
            )
        return dev
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(
                "device 'mps' was requested but Apple MPS is not available here; "
                "use device: 'cpu' or 'auto'"
            )
        return torch.device("mps")
    raise ConfigError(
        f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
    )


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for one with neither)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
