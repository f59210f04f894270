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
from rankopt.contract import hookspecs
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


# -- the methods and functions the guide names, against their real signatures ----------------

def _documented_api() -> dict[str, list[str]]:
    """Real parameter lists (``*`` marks keyword-only, ``**x`` a var-keyword) by name."""
    from rankopt.deploy.artifacts import load_compressed, save_compressed
    from rankopt.compression.spectral import SpectralCache, get_default_cache
    from rankopt.testing import check_decomposer, check_installed_plugins, check_rank_selector, check_strategy

    def render(fn: object) -> list[str]:
        out: list[str] = []
        for p in inspect.signature(fn).parameters.values():  # type: ignore[arg-type]
            if p.name == "self":
                continue
            if p.kind is p.KEYWORD_ONLY and "*" not in out and not any(o.startswith("*") for o in out):
                out.append("*")
            out.append({p.VAR_KEYWORD: "**", p.VAR_POSITIONAL: "*"}.get(p.kind, "") + p.name)  # type: ignore[call-overload]
        return out

    api: dict[str, list[str]] = {}
    for cls in (rankopt.Decomposer, rankopt.RankSelector, rankopt.Strategy, SpectralCache):
        for name, fn in inspect.getmembers(cls, inspect.isfunction):
            if not name.startswith("_"):
                api[name] = render(fn)
    for fn in (save_compressed, load_compressed, get_default_cache, check_decomposer,
               check_rank_selector, check_strategy, check_installed_plugins):
        api[fn.__name__] = render(fn)
    return api


MENTION = re.compile(r"`(?:[\w.]+\.)?(\w+)\(([^`]*)\)`")


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated names of a documented call, defaults and annotations dropped."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    names = []
    for part in (p.strip() for p in parts):
        if part:
            names.append(re.split(r"[=:]", part, maxsplit=1)[0].strip())
    return names


def _prose() -> str:
    """The guide without its code blocks (the code is checked by running it)."""
    return FENCE.sub("", GUIDE.read_text()).replace("\n  ", " ").replace("\n", " ")


def _matches(documented: list[str], real: list[str]) -> bool:
    """Every positional parameter, in order; keyword-only ones may be left out (they are
    never passed by position, so leaving them out cannot mislead); ``...`` ends a prefix."""
    documented = [a for a in documented if a != "*"]
    if documented and documented[0] == "...":  # `build(..., initialize=False)`: named ones only
        return bool(documented[1:]) and set(documented[1:]) <= set(real)
    if documented and documented[-1] == "...":
        head = documented[:-1]
        return head == [a for a in real if a != "*"][: len(head)]
    positional = real[: real.index("*")] if "*" in real else real
    keyword = real[len(positional) + 1:] if "*" in real else []
    return any(documented == positional + keyword[:k] for k in range(len(keyword) + 1)) or (
        bool(keyword) and keyword[-1].startswith("**") and documented == positional + keyword
    )


def test_every_signature_the_guide_gives_is_the_real_one() -> None:
    api = _documented_api()
    checked = 0
    for name, args in MENTION.findall(_prose()):
        if name not in api or not args.strip():
            continue  # a bare `name()` mention names the method, it gives no signature
        real = api[name]
        assert _matches(_split_args(args), real), (
            f"docs/plugins.md gives `{name}({args})`, the real signature is {name}({', '.join(real)})"
        )
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize(
    "name",
    ["max_ranks", "cost", "build", "project", "rank_matrices", "ranks_from_matrix_ranks", "select",
     "save_compressed", "check_decomposer", "check_rank_selector", "check_installed_plugins"],
)
def test_the_guide_gives_the_full_signature_of(name: str) -> None:
    real = _documented_api()[name]
    given = [[a for a in _split_args(args) if a != "*"] for found, args in MENTION.findall(_prose()) if found == name]
    assert [a for a in real if a != "*"] in given, (
        f"docs/plugins.md never gives `{name}({', '.join(real)})`"
    )


def test_the_signature_check_catches_the_old_mistake() -> None:
    api = _documented_api()
    assert not _matches(_split_args("weight"), api["rank_matrices"])
    assert not _matches(_split_args("module, matrix_ranks"), api["ranks_from_matrix_ranks"])
    assert _matches(_split_args("weight, options"), api["rank_matrices"])
    assert not _matches(_split_args("dec, modules=None, *, input_hw=(8, 8), rtol=None"), api["check_decomposer"])
    assert _matches(_split_args("module"), api["check_module"])  # `name` is keyword-only
    assert _matches(_split_args("model, layers, decomposers, ..."), api["select_layers"])
    assert _matches(_split_args("..., initialize=False"), api["build"])
    assert not _matches(_split_args("..., initialise=False"), api["build"])


def test_the_guide_states_what_the_checks_cost_from_the_recorded_benchmark() -> None:
    text = _prose()
    assert "about a second each" not in text
    assert "What the checks cost." in text and "benchmarks/RESULTS.md" in text
    results = (GUIDE.parents[1] / "benchmarks" / "RESULTS.md").read_text()
    assert "## rankopt.testing: contract-check time per installed plugin (1 thread)" in results


def test_the_guides_example_methods_have_the_base_classes_signatures(example_package: Path) -> None:
    from rankopt_myplugins.decomposer import LowRankLinearDecomposer
    from rankopt_myplugins.selector import ScaledRankSelector
    from rankopt_myplugins.strategy import ShortFinetuneStrategy

    compared = 0
    for cls, base in ((LowRankLinearDecomposer, rankopt.Decomposer), (ScaledRankSelector, rankopt.RankSelector),
                      (ShortFinetuneStrategy, rankopt.Strategy)):
        for name, fn in vars(cls).items():
            if inspect.isfunction(fn) and not name.startswith("_") and hasattr(base, name):
                mine = [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]
                real = [(p.name, p.kind) for p in inspect.signature(getattr(base, name)).parameters.values()]
                assert mine == real, f"the guide's {cls.__name__}.{name}{inspect.signature(fn)} differs from the base's"
                compared += 1
    assert compared >= 10  # every method the example overrides, rank_matrices included
