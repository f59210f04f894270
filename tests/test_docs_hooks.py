"""docs/plugins.md stays true: every hook with its signature is documented, every code block
is valid, and the example package on the page installs through its entry point and passes
the contract checks."""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import rankopt
from rankopt import hookspecs
from rankopt.cli import main

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
EXAMPLE_FILE = re.compile(r"^# (rankopt_myplugins/\w+\.py)\n")


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(GUIDE.read_text()) if lang == language]


def hook_specs() -> list[tuple[str, list[str]]]:
    out = []
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("rankopt_") and hasattr(fn, "rankopt_spec"):
            out.append((name, list(inspect.signature(fn).parameters)))
    return out


def test_the_spec_list_is_what_the_plugin_manager_knows() -> None:
    names = {name for name, _ in hook_specs()}
    assert names == set(hookspecs.__all__) - {"hookspec", "hookimpl"}
    assert len(names) == 7


@pytest.mark.parametrize(("name", "params"), hook_specs())
def test_every_hook_and_its_signature_is_in_the_guide(name: str, params: list[str]) -> None:
    signature = f"{name}({', '.join(params)})"
    assert signature in GUIDE.read_text(), f"docs/plugins.md does not document `{signature}`"


def test_python_blocks_compile() -> None:
    sources = blocks("python")
    assert len(sources) >= 6
    for i, source in enumerate(sources):
        compile(source, f"docs/plugins.md python block {i}", "exec")


def test_toml_blocks_parse_and_name_an_entry_point() -> None:
    (toml,) = blocks("toml")
    project = tomllib.loads(toml)["project"]
    assert project["entry-points"]["rankopt"] == {"myplugins": "rankopt_myplugins.plugin"}


def test_cli_commands_in_the_guide_exist(capsys: pytest.CaptureFixture[str]) -> None:
    lines = [ln.split("#")[0].split() for b in blocks("bash") for ln in b.splitlines() if ln.startswith("rankopt ")]
    assert lines
    for words in lines:
        capsys.readouterr()
        assert main([words[1], "--help"]) == 0
        helptext = capsys.readouterr().out
        for option in (w for w in words[2:] if w.startswith("--")):
            assert option in helptext, f"`rankopt {words[1]}` has no option {option}"


@pytest.fixture
def example_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The guide's example package, written from its code blocks and 'installed' with a dist-info."""
    monkeypatch.delenv("RANKOPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    package = tmp_path / "rankopt_myplugins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    written = []
    for source in blocks("python"):
        match = EXAMPLE_FILE.match(source)
        if match:
            (tmp_path / match.group(1)).write_text(source)
            written.append(match.group(1))
    assert sorted(written) == [f"rankopt_myplugins/{m}.py" for m in ("data", "decomposer", "plugin", "selector", "strategy")]
    project = tomllib.loads(blocks("toml")[0])["project"]
    info = tmp_path / f"rankopt_myplugins-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    eps = "".join(f"{k} = {v}\n" for k, v in project["entry-points"]["rankopt"].items())
    (info / "entry_points.txt").write_text(f"[rankopt]\n{eps}")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    rankopt.reset_registry()
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == "rankopt_myplugins" or n.startswith("rankopt_myplugins.")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        rankopt.reset_registry()


def test_the_example_package_installs_and_passes_the_contract(example_package: Path) -> None:
    reg = rankopt.get_registry()
    assert reg.failures == []
    expected = {"decomposers": "lowrank_linear", "rank_selectors": "scaled", "strategies": "short_finetune",
                "models": "tiny_cnn", "datasets": "noisy_blobs"}
    for family, name in expected.items():
        source = reg.source_of(family, name)
        assert (source.distribution, source.version) == ("rankopt-myplugins", "0.1.0")
    # the guide's own test file, run as its author would
    (tests,) = [b for b in blocks("python") if b.startswith("# tests/test_contract.py")]
    namespace: dict[str, object] = {}
    exec(compile(tests, "docs/plugins.md tests/test_contract.py", "exec"), namespace)
    ran = [name for name in namespace if name.startswith("test_")]
    assert len(ran) == 4
    for name in ran:
        namespace[name]()  # type: ignore[operator]
    net = rankopt.model("tiny_cnn", num_classes=4)
    splits = rankopt.dataset("noisy_blobs", n=64)
    x, _ = splits.train[0]
    assert net(x[None]).shape == (1, 4)
    with pytest.raises(rankopt.ConfigError, match="n must be at least 8, got 3"):
        rankopt.dataset("noisy_blobs", n=3)
    with pytest.raises(rankopt.ConfigError, match=r"scale must be a number in \(0, 1\], got 2"):
        rankopt.rank_selector("scaled").validate_params({"scale": 2})
