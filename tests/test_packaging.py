"""The package metadata installs without warnings: an SPDX license string (PEP 639), which
setuptools reads from release 77 on; a license table is deprecated and warns on install."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("project", [ROOT, *sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))])
def test_the_license_is_an_spdx_string_and_setuptools_reads_it(project: Path) -> None:
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"  # a string, not {text = ...}
    for pattern in meta["project"].get("license-files", []):
        assert list(project.glob(pattern)), f"license-files {pattern!r} matches no file"
    (setuptools,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = re.search(r">=\s*(\d+)", setuptools)
    assert minimum and int(minimum.group(1)) >= 77, setuptools
    assert not any(c.startswith("License ::") for c in meta["project"].get("classifiers", []))
