"""The small study most tests start from: small_cnn (width 8) on digits, trained for a
moment; each test changes only what it is about."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

RANDOM = {"name": "random", "seed": 0}  # the sampler of most tests: no model of the trials


ENERGY = {"energy": {"p": {"low": 0.5, "high": 0.95}}}  # the selector of most tests
FINETUNE = {"finetune": {"epochs": 0.2, "lr": 0.02}}  # a moment of fine-tuning

RAY = {"backend": "ray", "max_concurrent": 2, "resources": {"cpus": 1, "gpus": 0}}  # two 1-CPU trials at a time


def digits_study(name: str, run_dir: Path | None = None, /, **changes: Any) -> dict[str, Any]:
    """The small study with two decomposers, the energy selector and a short fine-tuning."""
    changes = {"data": {"name": "digits", "batch_size": 128}, "decomposers": ["tucker2", "svd"], "trials": 2,
               "selectors": ENERGY, "sampler": RANDOM, "strategies": FINETUNE, **changes}
    return small_study(name, **{**({"run_dir": str(run_dir)} if run_dir is not None else {}), **changes})


def tiny_cli_study(**changes: Any) -> dict[str, Any]:
    """The study the command-line tests run: two selectors, sampler seed 1."""
    selectors = {"energy": {"p": {"low": 0.5, "high": 0.95}}, "fixed": {}}
    return digits_study("tiny", **{"selectors": selectors, "sampler": {"name": "random", "seed": 1}, **changes})


def small_study(name: str, tmp_path: Path | None = None, /, **changes: Any) -> dict[str, Any]:
    """A study dict whose trials take seconds; ``changes`` replace top-level keys and
    ``tmp_path`` sets ``run_dir`` to ``tmp_path / "run"``."""
    config: dict[str, Any] = {"name": name, "model": {"name": "small_cnn", "kwargs": {"width": 8}},
                              "data": {"name": "digits", "batch_size": 64}, "reference": {"epochs": 1, "lr": 0.05},
                              "decomposers": ["tucker2"]}
    if tmp_path is not None:
        config["run_dir"] = str(Path(tmp_path) / "run")
    return {**config, **changes}


def blobs(n: int, seed: int) -> "TensorDataset":
    """Two classes of 1x6x6 images: bright top half or bright bottom half, plus noise."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) * 0.3
    x[y == 0, :, :3] += 1.0
    x[y == 1, :, 3:] += 1.0
    return TensorDataset(x, y)


def run_study_file(folder: Path, study: dict[str, Any], *args: str, file_name: str = "study.yaml",
                   run_name: str = "run") -> tuple[int, Path, Path]:
    """Write ``study`` as ``folder/file_name`` and run it with ``rankopt run`` into
    ``folder/run_name`` (quiet, with ``args`` added); (exit code, study file, run dir)."""
    from rankopt.cli import main

    study_file = Path(folder) / file_name
    study_file.write_text(yaml.safe_dump(study))
    run_dir = Path(folder) / run_name
    return main(["run", str(study_file), "--run-dir", str(run_dir), "-q", *args]), study_file, run_dir
