"""The contrib distribution plugins/rankopt-tensor-ring, as a user installs it.

Its own test suite (plugins/rankopt-tensor-ring/tests) is collected by the main run
through ``testpaths`` in pyproject.toml. This file checks what only a real installation
shows: built as a wheel into a fresh environment, the plugin is discovered through its
entry point, passes the contract checks there, and drives a study whose front is made
of Tensor Ring trials.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "plugins" / "rankopt-tensor-ring"


def test_the_distribution_declares_its_entry_point_and_depends_on_the_public_api_only() -> None:
    import tomllib

    project = tomllib.loads((DIST / "pyproject.toml").read_text())["project"]
    assert project["name"] == "rankopt-tensor-ring"
    assert project["entry-points"]["rankopt"] == {"tensor_ring": "rankopt_tensor_ring.plugin"}
    imports = re.compile(r"^\s*(?:from|import) rankopt\b(?!_tensor_ring)(.*)$")
    for source in (DIST / "rankopt_tensor_ring").glob("*.py"):
        for line in source.read_text().splitlines():
            match = imports.match(line)
            if match:  # only `from rankopt import ...`, never rankopt.<submodule>
                assert match.group(1).startswith(" import "), f"{source.name} reaches into rankopt's internals: {line!r}"
    assert (DIST / "README.md").is_file() and (DIST / "tests").is_dir()


def _view_without_the_plugin(view: Path) -> None:
    """Symlinks to this environment's site-packages, minus the editable rankopt-tensor-ring."""
    site = Path(sysconfig.get_paths()["purelib"])
    view.mkdir()
    for entry in site.iterdir():
        if "rankopt_tensor_ring" in entry.name:
            continue
        (view / entry.name).symlink_to(entry)


FRESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    import rankopt
    out = {"names": rankopt.plugin_names()["decomposers"], "failures": [str(f) for f in rankopt.get_registry().failures]}
    if "--full" in sys.argv:
        import rankopt_tensor_ring
        from rankopt.testing import check_decomposer
        source = rankopt.get_registry().source_of("decomposers", "tensor_ring")
        out["source"] = [source.distribution, source.version, rankopt_tensor_ring.__file__]
        out["checks"] = [[r.check, r.passed, r.reason] for r in check_decomposer(rankopt.decomposer("tensor_ring"))]
        result = rankopt.run_study(
            {
                "name": "tr",
                "model": {"name": "small_cnn", "kwargs": {"width": 8}},
                "data": {"name": "digits", "batch_size": 64},
                "reference": {"epochs": 1, "lr": 0.05},
                "targets": {"include": ["3", "7"]},
                "decomposers": ["tensor_ring"],
                "selectors": {"fixed": {"fraction": {"low": 0.1, "high": 0.5}}},
                "strategies": {"finetune": {"epochs": 0.2, "lr": 0.02}},
                "sampler": {"name": "random", "seed": 0},
                "trials": 3,
                "device": "cpu",
                "run_dir": sys.argv[1],
            },
            progress=False,
        )
        out["front"] = [[t.trial, t.params, t.accuracy, t.spec] for t in result.front()]
        out["reference"] = result.reference["params"]
    print("RESULT " + json.dumps(out))
    """
)


def _run(python: Path, *args: str) -> dict:
    """Run FRESH_SCRIPT with ``python``; the JSON it prints."""
    env = {k: v for k, v in os.environ.items() if k != "RANKOPT_DISABLE_PLUGIN_AUTOLOAD"}
    proc = subprocess.run(
        [str(python), "-c", FRESH_SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_fresh_install_is_discovered_checked_and_used_in_a_study(tmp_path: Path) -> None:
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=120)
    python = fresh / "bin" / "python"
    site = Path(
        subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       capture_output=True, text=True, check=True).stdout.strip()
    )
    # rankopt, torch, pip and setuptools come from this environment, the plugin does not
    _view_without_the_plugin(tmp_path / "view")
    (site / "_rankopt_test_view.pth").write_text(f"import site; site.addsitedir({str(tmp_path / 'view')!r})\n")

    source = tmp_path / "src"
    shutil.copytree(DIST, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr

    after = _run(python, str(tmp_path / "run"), "--full")
    assert "tensor_ring" in after["names"] and after["failures"] == []
    distribution, version, module_file = after["source"]
    assert (distribution, version) == ("rankopt-tensor-ring", "0.1.0")
    # the wheel installed into the fresh environment, not the editable checkout of this one
    assert module_file.startswith(str(site)), module_file
    assert "tucker2" in after["names"]
    failed = [c for c in after["checks"] if not c[1]]
    assert not failed and len(after["checks"]) >= 12, failed
    assert after["front"], "the study ended without a completed trial"
    for trial, params, accuracy, spec in after["front"]:
        assert spec and {v["decomposer"] for v in spec.values()} == {"tensor_ring"}
        assert params < after["reference"] and 0.0 <= accuracy <= 1.0
