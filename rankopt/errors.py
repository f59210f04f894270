"""Exceptions raised by rankopt.

Every message names the thing, the rule, the value received and the fix, so that a
user can act on it without reading a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "RankoptError",
    "ConfigError",
    "UnknownNameError",
    "DuplicateNameError",
    "PluginError",
    "UnsupportedModuleError",
    "InvalidRanksError",
    "DecompositionError",
    "TrainingDivergedError",
    "ArtifactError",
    "ExportError",
    "StudyInterrupted",
    "UnsafePathError",
    "DiskFullError",
]


class RankoptError(Exception):
    """Base class of all rankopt errors."""


class ConfigError(RankoptError, ValueError):
    """A usage or configuration error: bad input detected before any work starts.

    The CLI prints it as one line and exits with status 2.
    """


class UnknownNameError(ConfigError, KeyError):
    """A plugin name that no registered plugin provides."""

    def __init__(self, family: str, name: object, known: Iterable[str]) -> None:
        self.family = family
        self.name = name
        self.known = sorted(known)
        listed = ", ".join(repr(k) for k in self.known) or "(none registered)"
        plural = f"{family[:-1]}ies" if family.endswith("y") else f"{family}s"
        super().__init__(
            f"unknown {family} {name!r}: known {plural} are {listed}; "
            "check the spelling, or install the plugin that provides it "
            "(`rankopt plugins` lists what is installed)"
        )

    def __str__(self) -> str:  # KeyError would otherwise add quotes
        return str(self.args[0])


class DuplicateNameError(RankoptError):
    """Two plugins registered the same name in one family."""


class PluginError(RankoptError):
    """A plugin failed to load, raised inside a hook, or returned an invalid record."""


class UnsupportedModuleError(RankoptError, TypeError):
    """A decomposer was asked to handle a module it does not support."""


class InvalidRanksError(ConfigError):
    """Ranks outside [1, largest] or of the wrong length for a decomposer."""


class DecompositionError(RankoptError, ArithmeticError):
    """A decomposition failed numerically (diverged, produced NaN/inf)."""


class TrainingDivergedError(RankoptError, ArithmeticError):
    """The training loss became non-finite."""


class ArtifactError(RankoptError):
    """A model file or run directory is missing, truncated, tampered with or of an unknown format."""


class ExportError(RankoptError):
    """An exported ONNX/TorchScript file could not be written or does not match PyTorch."""
class UnsafePathError(ConfigError):
    """A path in a run directory (or an output) that rankopt refuses to write or remove:
    a symbolic link, a path leading outside the run directory, a run's own files as an
    output, or a file where a folder belongs (one line, exit 2)."""


class DiskFullError(RankoptError, OSError):
    """No space left on the device: the message names the path and the free space (exit 1)."""

    def __str__(self) -> str:  # OSError would add "[Errno 28]"
        return str(self.args[1]) if len(self.args) > 1 else super().__str__()


class StudyInterrupted(RankoptError):
    """Ctrl-C (SIGINT) stopped a study; completed trials are kept (the CLI exits 130)."""
