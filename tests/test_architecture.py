"""The package's import graph: no circle, and no import from a layer above.

Read from the source with ``ast`` alone: every import counts, at module level, inside a
function (lazy) or under ``if TYPE_CHECKING`` (a type needed only for annotations moves
down instead). Importing ``rankopt.a.b`` also runs ``rankopt/a/__init__.py``, so a module
depends on its parent packages too.

The old flat module paths below are meant (rankopt-rewrite: skip).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rankopt"

# The layers, bottom to top, by folder below rankopt/. A module may import its own layer
# and those below it. The package root (rankopt/__init__.py, study.py) is the public API
# the command line calls; __main__.py runs the command line.
ROOT = "(root)"
LAYERS = (
    "core",  # records, errors, the small data types the contract names
    "contract",  # hookspecs, the plugin manager, the base classes of the plugin families
    "compression",  # surgery, accounting, the spectral cache, rank selection, latency
    "training",  # the loop, distillation, the trial context, devices
    "plugins",  # the built-in methods
    "config",  # the study file: schema, sections, checks, YAML
    "deploy",  # compressed-model files, export, densify (search writes every trial's model)
    "search",  # backends, space, seeding, fidelity, the run directory
    "results",  # reading a run, held-out evaluation, the report
    "testing",  # the contract kit (``rankopt plugins --check`` runs it)
    ROOT,  # the public API: rankopt/__init__.py, study.py
    "cli",  # parse, call one public function, render
)
TOP = len(LAYERS)  # rankopt/__main__.py


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    parts = module.split(".")
    if module == "rankopt.__main__":
        return TOP
    if len(parts) == 1 or parts[1] not in LAYERS:
        return LAYERS.index(ROOT)
    return LAYERS.index(parts[1])


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name if name != "rankopt" else None


def imports_of(module: str, *, parents: bool = True) -> Iterator[tuple[str, int]]:
    """(imported rankopt module, line) for every import in ``module``, and (line 0) its
    parent packages, which a package's own ``__init__`` importing its modules is no circle of."""
    path = MODULES[module]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rankopt."):
                    target = _resolve(alias.name)
                    if target:
                        yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != "rankopt" and not source.startswith("rankopt."):
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                target = full if full in MODULES else _resolve(source)
                if target is None and source == "rankopt":
                    target = "rankopt"  # a name from the package root: the public face
                if target:
                    yield target, node.lineno
    parts = module.split(".") if parents else []
    for i in range(2, len(parts)):
        yield ".".join(parts[:i]), 0


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in imports_of(m, parents=False) if t != m} for m in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in edges:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def upward_imports() -> list[str]:
    found = []
    for module in MODULES:
        here = layer_of(module)
        for target, line in imports_of(module):
            if layer_of(target) > here:
                found.append(
                    f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} {module} ({LAYERS[here] if here < TOP else '__main__'})"
                    f" imports {target} ({LAYERS[layer_of(target)] if layer_of(target) < TOP else '__main__'})"
                )
    return found


def test_every_folder_is_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(LAYERS) - {ROOT}, f"put {sorted(folders - set(LAYERS))} in LAYERS, in its place bottom to top"


def test_no_import_circle() -> None:
    assert cycles(graph()) == []


def test_no_import_from_a_layer_above() -> None:
    assert upward_imports() == []


def test_the_root_holds_only_the_public_face() -> None:
    root = sorted(m for m in MODULES if m.count(".") == 1 and MODULES[m].name != "__init__.py")
    assert root == ["rankopt.__main__", "rankopt._moved", "rankopt.study"]


def test_the_checks_catch_a_circle_and_an_upward_import() -> None:
    # the checks themselves can fail: a two-module ring, and core importing the cli
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert layer_of("rankopt.core.errors") < layer_of("rankopt.cli.app")
    assert layer_of("rankopt.contract.decomposer") == LAYERS.index("contract")
    assert layer_of("rankopt.plugins.decomposers.cp") == LAYERS.index("plugins")


@pytest.mark.parametrize("old", ["rankopt.surgery", "rankopt.artifacts", "rankopt.config_checks", "rankopt.hookspecs",
                                 "rankopt.manager", "rankopt.errors", "rankopt.trial", "rankopt.report"])
def test_the_old_module_paths_still_import(old: str) -> None:
    import importlib
    import sys
    import warnings

    from rankopt._moved import MOVED

    sys.modules.pop(old, None)  # imported before (by another test): import it afresh
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])
    assert any(issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message) for w in caught)


def test_the_old_modules_that_became_packages_keep_their_names() -> None:
    from rankopt.config import StudyConfig, load_config  # noqa: F401
    from rankopt.deploy import densify, export, fold_batchnorm  # noqa: F401
    from rankopt.results import StudyResult, pareto_front_2d  # noqa: F401
    from rankopt.training import TrainResult, evaluate, train  # noqa: F401


def test_the_command_line_is_thin() -> None:
    # parse, call one public function, render: no command module grows a domain layer again
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "cli").glob("*.py")}
    assert max(sizes.values()) <= 250, sizes
    import rankopt

    assert callable(rankopt.inspect_layers) and "inspect_layers" in rankopt.__all__
