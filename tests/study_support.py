"""The small study most tests start from: small_cnn (width 8) on digits, trained for a
moment; each test changes only what it is about."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RANDOM = {"name": "random", "seed": 0}  # the sampler of most tests: no model of the trials


RAY = {"backend": "ray", "max_concurrent": 2, "resources": {"cpus": 1, "gpus": 0}}  # two 1-CPU trials at a time


def digits_study(name: str, run_dir: Path | None = None, /, **changes: Any) -> dict[str, Any]:
    """The small study with two decomposers, the energy selector and a short fine-tuning."""
    changes = {"data": {"name": "digits", "batch_size": 128}, "decomposers": ["tucker2", "svd"], "trials": 2,
               "selectors": {"energy": {"p": {"low": 0.5, "high": 0.95}}}, "sampler": RANDOM,
               "strategies": {"finetune": {"epochs": 0.2, "lr": 0.02}}, **changes}
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
