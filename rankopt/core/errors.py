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
    "did_you_mean",
    "UnsafePathError",
    "DiskFullError",
]


MAX_LISTED = 12  # an error lists the known names when there are at most this many


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """``": did you mean 'resnet20'?"`` for the closest known names (difflib), else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), list(known), n=3, cutoff=0.6)
    return f": did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


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
        plural = f"{family[:-1]}ies" if family.endswith("y") else f"{family}s"
        close = did_you_mean(name, self.known)
        if len(self.known) <= MAX_LISTED:
            listed = ", ".join(repr(k) for k in self.known) or "(none registered)"
            known_text = f"known {plural} are {listed}"
        else:  # a long list (every torchvision model) would bury the answer
            known_text = f"{len(self.known)} {plural} are known (`rankopt plugins` lists them)"
        super().__init__(
            f"unknown {family} {name!r}{close}; {known_text}; check the spelling or install the "
            "plugin that provides it"
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
