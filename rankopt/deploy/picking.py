"""Write a picked trial's model file: as it is, with BatchNorm folded, or with the layers
that run slower factorized made dense again (``rankopt pick``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankopt.core.errors import ArtifactError, ConfigError, ExportError

__all__ = ["LatencySettings", "check_builds", "check_out_path", "write_picked"]


@dataclass(frozen=True)
class LatencySettings:
    """Where ``keep_faster`` times the layers (a study's ``latency`` section)."""

    runtime: str = "eager"
    batch: int = 1
    threads: int = 1
    rounds: int = 15


@dataclass
class PickedFile:
    """What :func:`write_picked` wrote, and the lines that say how."""

    path: Path
    notes: list[str] = field(default_factory=list)
    # the file's own params and FLOPs where --keep-faster made layers dense (else None)
    params: int | None = None
    flops: int | None = None


def check_out_path(out: Path, source: Path) -> None:
    """``out`` must name a new or replaceable file, not a folder or the trial's own file."""
    text = str(out)
    if not text.strip() or text in (".", "..") or text.endswith(("/", os.sep)):
        raise ConfigError(f"--out: {text!r} is not a file name; give a path such as model.pt")
    if out.is_dir():
        raise ConfigError(f"--out: {text!r} is a directory; give a file path such as {text}/model.pt")
    if out.exists() and out.resolve() == source.resolve():
        raise ConfigError(
            f"--out: {text!r} is the trial's own model file; give a path outside the run directory"
        )
    probe = out.parent if str(out.parent) else Path(".")
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK) or (
        out.exists() and not os.access(out, os.W_OK)
    ):
        raise ConfigError(f"--out: {text!r} cannot be written by this user; give a writable path")


def check_builds(payload: Any, source: Path, *, allow_modules: Sequence[str] = (),
                 module_folders: Sequence[str | None] = ()) -> None:
    """Build the model of a checked trial file, so a file that cannot load is never
    copied (a run on a module passed from Python cannot be rebuilt here: its tensors were
    checked against the spec only)."""
    from rankopt.deploy.artifacts import build_compressed

    base = payload.get("base") or {}
    if base.get("model") or base.get("callable"):
        build_compressed(payload, source, allow_modules=allow_modules, module_folders=module_folders)


def write_picked(source: Path, out: Path, *, fold_bn: bool = False, keep_faster: LatencySettings | None = None,
                 allow_modules: Sequence[str] = (), allow_unchecked: bool = False,
                 module_folders: Sequence[str | None] = (), force: bool = False) -> PickedFile:
    """Copy the model file ``source`` to ``out``, with BatchNorm folded and/or the slower
    layers dense (``keep_faster``). ``out`` is never among a run directory's own files
    (unless ``force``) and never a storage; a reader never sees half a file: temporaries
    beside it (no link followed), fsync, one rename, and a full disk leaves the old file."""
    from rankopt.core.safe_paths import check_output, publish, temp_beside
    from rankopt.deploy.artifacts import read_compressed

    if not source.is_file():
        raise ArtifactError(f"model file {str(source)!r} is missing")
    check_out_path(out, source)
    check_output(out, force=force)
    read_compressed(source, allow_unchecked=allow_unchecked)  # refuse to copy a torn or foreign file
    picked = PickedFile(out)
    with temp_beside(out) as tmp:
        if keep_faster is not None:
            with temp_beside(out) as dense:
                _write_faster(picked, source, dense, keep_faster, allow_modules, allow_unchecked, module_folders)
                if fold_bn:
                    _write_folded(dense, tmp, allow_modules=allow_modules, module_folders=module_folders)
                else:
                    os.replace(dense, tmp)
        elif fold_bn:
            _write_folded(source, tmp, allow_modules=allow_modules, allow_unchecked=allow_unchecked,
                          module_folders=module_folders)
        else:
            _copy_into(source, tmp, out)
        publish(tmp, out)
    return picked


def _copy_into(source: Path, tmp: Path, out: Path) -> None:
    """Copy ``source`` into the temporary ``tmp`` made for ``out`` (a full disk names
    ``out`` and the size needed)."""
    import errno

    from rankopt.core.safe_paths import disk_full_error

    try:
        with open(source, "rb") as src, os.fdopen(os.open(tmp, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)), "wb") as dst:
            shutil.copyfileobj(src, dst)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(out, source.stat().st_size) from exc
        raise


def _write_folded(source: Path, out: Path, *, allow_modules: Sequence[str], allow_unchecked: bool = False,
                  module_folders: Sequence[str | None] = ()) -> None:
    """``source`` re-written with ``metadata.fold_bn`` after checking the folded model
    equals the unfolded one to 1e-5 on a seeded batch (``load_compressed`` folds)."""
    import torch

    from rankopt.deploy.artifacts import load_compressed, read_compressed, save_compressed
    from rankopt.deploy.exporting import fold_batchnorm

    payload = read_compressed(source, allow_unchecked=allow_unchecked)
    if (payload.get("metadata") or {}).get("fold_bn"):  # folded already
        shutil.copyfile(source, out)
        return
    model = load_compressed(source, allow_modules=allow_modules, allow_unchecked=allow_unchecked,
                            module_folders=module_folders)
    shape = payload.get("input_shape") or []
    if shape:
        x = torch.randn((4, *shape[1:]), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((fold_batchnorm(model)(x) - model(x)).abs().max())
        if not diff <= 1e-5:
            raise ExportError(f"folding BatchNorm changed the outputs by up to {diff:.3g} (> 1e-5); nothing written")
    metadata = {**(payload.get("metadata") or {}), "fold_bn": True}
    save_compressed(out, model, payload["spec"], base=payload["base"], input_shape=shape or None, metadata=metadata)


def _write_faster(picked: PickedFile, source: Path, out: Path, latency: LatencySettings,
                  allow_modules: Sequence[str], allow_unchecked: bool = False,
                  module_folders: Sequence[str | None] = ()) -> None:
    """``source`` re-written with the layers that run slower factorized than dense (in the
    study's ``latency`` runtime and batch) made dense again (``rankopt.densify``)."""
    from rankopt.compression.accounting import count
    from rankopt.deploy.artifacts import load_compressed, read_compressed, save_compressed
    from rankopt.deploy.keep_faster import densify_slower

    payload = read_compressed(source, allow_unchecked=allow_unchecked)
    if (payload.get("metadata") or {}).get("fold_bn"):
        shutil.copyfile(source, out)  # a folded file's layers are not the spec's any more
        picked.notes.append("--keep-faster: the trial's file has BatchNorm folded; written as it is")
        return
    shape = tuple(payload.get("input_shape") or ())
    if not shape:
        raise ArtifactError(f"model file {str(source)!r} records no input shape, so its layers cannot be timed")
    done = densify_slower(
        load_compressed(source, allow_modules=allow_modules, allow_unchecked=allow_unchecked,
                        module_folders=module_folders), source, payload,
        shape, runtime=latency.runtime, batch=latency.batch, threads=latency.threads, rounds=latency.rounds,
        allow_modules=allow_modules, allow_unchecked=allow_unchecked, module_folders=module_folders)
    picked.notes += done.lines("written dense")
    metadata: dict[str, Any] = {**(payload.get("metadata") or {}), "dense_again": sorted(done.slower)}
    save_compressed(out, done.model, done.kept, base=payload["base"], input_shape=shape, metadata=metadata)
    if done.slower:  # the file differs from the trial's figures: say what it holds
        cost = count(done.model, shape)
        picked.params, picked.flops = cost.params, cost.flops
    load_compressed(out, allow_modules=allow_modules, module_folders=module_folders)  # it must load as written
