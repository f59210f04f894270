"""Accuracy of saved trial models on a split the search never saw (``rankopt evaluate``).

The search optimizes validation accuracy, so a front chosen on it is optimistic; the
test split gives the honest number. Results are cached in ``RUN_DIR/evaluation.json``
(``{"test": {"<trial>": accuracy}}``) so ``pick`` and ``report`` reuse them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from rankopt.config.schema import StudyConfig
from rankopt.core.errors import ConfigError
from rankopt.contract.dataset import DatasetSplits
from rankopt.deploy.trial_files import file_digest
from rankopt.core.safe_paths import atomic_write_text

__all__ = ["SPLITS", "EVALUATION_FILE", "hold_out_test", "config_splits", "cached_accuracies",
           "evaluate_trials"]

SPLITS = ("test", "val")
EVALUATION_FILE = "evaluation.json"


class SavedRun(Protocol):
    """What evaluation reads of a run (a :class:`~rankopt.StudyResult` is one)."""

    @property
    def run_dir(self) -> Path: ...

    @property
    def config(self) -> StudyConfig: ...

    def load_model(self, trial: int, *, model: nn.Module | None = None, allow_unchecked: bool = False) -> nn.Module: ...

    def local_model(self, record: Any) -> Any: ...

    def pick(self, *, trial: int | None = None) -> Any: ...


def hold_out_test(splits: DatasetSplits, fraction: float | None, seed: int) -> DatasetSplits:
    """``splits`` with ``fraction`` of its training data held out as the test split.

    A plain seeded random split (``torch.utils.data.random_split``): datasets in general
    expose no label array to stratify on (``digits``' own ``test_fraction`` is stratified).
    """
    if fraction is None or fraction == 0:
        return splits
    if splits.test is not None:
        raise ConfigError(
            f"data.test_fraction: {fraction} asks to hold out training data as the test split, "
            "but the dataset already has a test split; remove data.test_fraction or the "
            "dataset's own test data"
        )
    if isinstance(splits.train, torch.utils.data.DataLoader):
        raise ConfigError(
            "data.test_fraction: cannot split a DataLoader; pass Datasets in DatasetSplits, "
            "or pass test= yourself"
        )
    n = len(splits.train)  # type: ignore[arg-type]
    held = max(1, round(n * fraction))
    if held >= n:
        raise ConfigError(f"data.test_fraction: {fraction} of {n} training samples leaves none to train on")
    train, test = torch.utils.data.random_split(
        splits.train, [n - held, held], generator=torch.Generator().manual_seed(seed)
    )
    return DatasetSplits(train=train, val=splits.val, num_classes=splits.num_classes,
                         input_shape=splits.input_shape, test=test)


def config_splits(config: StudyConfig, what: str = "evaluate") -> DatasetSplits:
    """The splits a study file names (the registered dataset, with ``data.test_fraction``)."""
    from rankopt.contract.manager import get_registry

    if config.data.name is None:
        raise ConfigError(
            f"study {config.name!r} was run on data passed from Python (DatasetSplits), which a run "
            f"directory cannot rebuild; to {what}, pass it: "
            "StudyResult(run_dir).evaluate(data=DatasetSplits(...))"
        )
    splits = get_registry().create("datasets", config.data.name, **config.data.kwargs)
    return hold_out_test(splits, config.data.test_fraction, config.seed)


def _cache_path(run_dir: Path) -> Path:
    return Path(run_dir) / EVALUATION_FILE


def _read(run_dir: Path) -> dict[str, Any]:
    path = _cache_path(run_dir)
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def cached_accuracies(run_dir: Path, split: str = "test") -> dict[int, float]:
    """``{trial: accuracy}`` measured before on ``split`` (empty when none), for the trials
    whose model file is still the one measured: each value is stored with the SHA-256 of
    the file's bytes (``files``), and a file replaced since, or a value stored without
    one (an older rankopt), is measured again."""
    raw = _read(Path(run_dir))
    values, files = raw.get(split, {}), (raw.get("files") or {}).get(split, {})
    if not isinstance(values, dict) or not isinstance(files, dict):
        return {}
    out = {}
    for key, value in values.items():
        entry = files.get(key)
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)):
            continue
        parts = Path(entry["path"]).parts  # only a trial file inside this run directory
        if len(parts) != 3 or parts[0] != "trials" or not parts[1].isdigit() or parts[2] != "model.pt":
            continue
        if file_digest(Path(run_dir) / entry["path"]) == entry.get("sha256"):
            try:
                out[int(key)] = float(value)
            except (TypeError, ValueError):
                continue
    return out


def _store(run_dir: Path, split: str, accuracies: Mapping[int, float], files: Mapping[int, dict[str, str]]) -> None:
    path = _cache_path(run_dir)
    raw = _read(run_dir)
    raw.setdefault(split, {}).update({str(k): v for k, v in accuracies.items()})
    raw.setdefault("files", {}).setdefault(split, {}).update({str(k): v for k, v in files.items()})
    # atomic (a crash never leaves a torn cache), never through a link in the run directory
    try:
        atomic_write_text(path, json.dumps(raw, indent=2, sort_keys=True), root=run_dir)
    except OSError as exc:  # read-only or full: the numbers are still given, just not kept
        import logging

        logging.getLogger("rankopt").warning(
            "could not keep the accuracies in %s (%s); they are measured again next time",
            path, exc.strerror or exc)


def evaluate_trials(
    result: SavedRun,
    trials: Iterable[int],
    *,
    split: str = "test",
    model: nn.Module | None = None,
    data: DatasetSplits | None = None,
    device: str | None = None,
    use_cache: bool = True,
    allow_unchecked: bool = False,
) -> dict[int, float]:
    """Accuracy of each trial's saved model on ``split`` ("test" or "val"); each file is
    checked to be its trial's (:meth:`StudyResult.load_model`) before it is measured, and
    the result cached under the file's SHA-256."""
    from rankopt.training.devices import resolve_device
    from rankopt.training.loop import evaluate
    from rankopt.training.trial import loader_for

    if split not in SPLITS:
        raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}")
    numbers = list(trials)
    have = cached_accuracies(result.run_dir, split) if use_cache and data is None else {}
    todo = [n for n in numbers if n not in have]
    if todo:
        config = result.config
        splits = data if data is not None else config_splits(config)
        dataset = splits.test if split == "test" else splits.val
        if dataset is None:
            raise ConfigError(
                f"study {config.name!r} has no test split, so there is no held-out accuracy "
                "(the search's numbers are validation numbers); give the dataset a test split "
                "(npz `test:`, digits `test_fraction:`) or set data.test_fraction in the study file"
            )
        loader = loader_for(dataset, batch_size=config.data.batch_size)
        dev = resolve_device(device or config.device)
        files: dict[int, dict[str, str]] = {}
        for number in todo:
            path = Path(result.local_model(result.pick(trial=number)).model_path)
            digest = file_digest(path)  # before loading: the bytes that are measured
            net = result.load_model(number, model=model, allow_unchecked=allow_unchecked)
            have[number] = evaluate(net, loader, device=dev)
            if digest is not None:
                files[number] = {"path": path.relative_to(path.parents[2]).as_posix(), "sha256": digest}
        if data is None:
            _store(result.run_dir, split, {n: have[n] for n in files}, files)
    return {n: have[n] for n in numbers}

