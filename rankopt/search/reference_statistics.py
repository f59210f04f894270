"""The study's calibration: its reference's input statistics, once per reference.

Collected on ``calibration.images`` training images (seeded order), written to
``RUN_DIR/cache/calibration/`` beside the spectral cache, and attached to the reference
so that every trial's copy decomposes data-aware (:mod:`rankopt.compression.calibration`).
With ``calibration.mode: sequential`` the reference also carries the calibration images,
and every trial's ``compress`` fits its layers in forward order
(:mod:`rankopt.compression.sequential`); the selectors still read the shared statistics.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

from rankopt.compression.calibration import (
    attach_statistics,
    collect_input_statistics,
    load_statistics,
    save_statistics,
    statistics_key,
)
from rankopt.compression.calibration_images import attach_images, calibration_images
from rankopt.config.schema import StudyConfig
from rankopt.training.devices import resolve_device
from rankopt.contract.dataset import DatasetSplits
from rankopt.compression.surgery import LayerInfo
from rankopt.training.trial import loader_for

__all__ = ["calibrate_reference"]

log = logging.getLogger("rankopt.study")


def calibrate_reference(
    reference: nn.Module,
    config: StudyConfig,
    splits: DatasetSplits,
    targets: Sequence[LayerInfo],
    run_dir: Path,
    reference_key: str,
) -> None:
    """Attach input statistics to ``reference``'s targets (from the cache when present)."""
    settings = config.calibration
    if settings is None or not targets:
        return
    names = [t.name for t in targets]
    # svd lowers convs too: those need im2col patch moments, the others channel moments
    patch = names if "svd" in config.decomposers else []
    # the mode and ridge do not change the statistics: both modes share one cache file
    options = {**settings.model_dump(exclude={"mode", "ridge"}), "patch": sorted(patch), "seed": config.seed}
    path = run_dir / "cache" / "calibration" / f"{statistics_key(reference_key, options)}.pt"
    stats = load_statistics(path, names)
    images = None
    if stats is None or settings.mode == "sequential":
        # a user's own DataLoader is used as it comes (seeded: the same images every time)
        loader = loader_for(splits.train, batch_size=min(128, settings.images), shuffle=True,
                            seed=config.seed)
        images = calibration_images(loader, settings.images)
    if stats is None:
        device = resolve_device(config.device)
        model = copy.deepcopy(reference).to(device)
        stats = collect_input_statistics(
            model, names, images.split(128), images=settings.images, patch_layers=patch,  # type: ignore[union-attr]
            damping=settings.damping, spectra=settings.spectra, device=device,
        )
        save_statistics(path, stats, root=run_dir)
        log.info("calibration: input statistics of %d layers from %d images", len(names),
                 settings.images)
    attach_statistics(reference, stats)
    if settings.mode == "sequential":  # every trial's compress fits its layers in forward order
        attach_images(reference, images, settings.damping, settings.ridge)  # type: ignore[arg-type]
