"""The plugin manager: built-ins from an explicit tuple, third parties from entry points.

Built-ins are registered from :data:`rankopt.plugins.BUILTIN_PLUGINS` (as pytest,
tox and datasette do), read by name like every plugin module: the built-in methods sit
in a layer above this one, which imports nothing of theirs; third-party plugins come from the ``rankopt`` entry-point
group unless ``RANKOPT_DISABLE_PLUGIN_AUTOLOAD=1``. A plugin that fails to import,
raises inside a hook or returns an invalid record is recorded as a
:class:`PluginFailure` with its distribution and reason; the others keep working.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from rankopt.contract import hookspecs
from rankopt.core.errors import DuplicateNameError, UnknownNameError
from rankopt.core.records import (
    DatasetInfo,
    DecomposerInfo,
    ModelInfo,
    PluginRecord,
    RankSelectorInfo,
    StrategyInfo,
)

__all__ = [
    "AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "FAMILIES",
    "PluginFailure",
    "Provided",
    "Registry",
    "get_registry",
    "reset_registry",
    "register_plugin",
]

AUTOLOAD_ENV = "RANKOPT_DISABLE_PLUGIN_AUTOLOAD"
ENTRY_POINT_GROUP = "rankopt"


@dataclass(frozen=True)
class Family:
    key: str  # plural key in plugin_names()
    label: str  # singular, for messages
    hook: str
    record_type: type[PluginRecord]


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family("decomposers", "decomposer", "rankopt_decomposers", DecomposerInfo),
        Family("rank_selectors", "rank selector", "rankopt_rank_selectors", RankSelectorInfo),
        Family("strategies", "strategy", "rankopt_strategies", StrategyInfo),
        Family("models", "model", "rankopt_models", ModelInfo),
        Family("datasets", "dataset", "rankopt_datasets", DatasetInfo),
    )
}


@dataclass(frozen=True)
class Source:
    """Where a plugin object came from."""

    plugin: str  # pluggy's name for the registered object
    distribution: str  # "rankopt" for built-ins
    version: str
    builtin: bool


@dataclass(frozen=True)
class Provided:
    """A record together with the plugin that provided it."""

    family: str
    record: PluginRecord
    source: Source


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used, and why."""

    plugin: str
    distribution: str
    version: str
    stage: str  # "import", "hook", "record", "duplicate"
    reason: str

    def __str__(self) -> str:
        return (
            f"plugin {self.plugin!r} from {self.distribution} {self.version} "
            f"failed at {self.stage}: {self.reason}"
        )


def _rankopt_version() -> str:
    try:
        return md.version("rankopt")
    except md.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


BUILTIN_PACKAGE = "rankopt.plugins"  # its BUILTIN_PLUGINS: the built-in modules, by name


class Registry:
    """All registered plugins, their records by family, and what failed."""

    def __init__(self, *, autoload: bool | None = None, extra: Iterable[Any] = ()) -> None:
        builtins: tuple[str, ...] = importlib.import_module(BUILTIN_PACKAGE).BUILTIN_PLUGINS

        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._sources: dict[str, Source] = {}
        version = _rankopt_version()
        for modname in builtins:
            # a broken built-in is our bug: let it raise
            module = importlib.import_module(modname)
            self._register(module, Source(modname, "rankopt", version, True))
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "").strip() not in ("1", "true", "yes")
        if autoload:
            self._load_entry_points()
        for i, obj in enumerate(extra):
            name = getattr(obj, "__name__", None) or f"extra-{i}"
            self._register(obj, Source(name, "(registered in-process)", "", False))
        self._records: dict[str, dict[str, list[Provided]]] = {}
        self._collect()

    # -- loading -----------------------------------------------------------------
    def _register(self, obj: Any, source: Source) -> None:
        try:
            self.pm.register(obj, name=source.plugin)
        except Exception as exc:  # pluggy validates the signatures of known hooks
            self.failures.append(
                PluginFailure(
                    source.plugin, source.distribution, source.version, "import",
                    f"{type(exc).__name__}: {exc}",
                )
            )
            return
        self._sources[source.plugin] = source
        # pluggy accepts @hookimpl functions of hooks nobody specified; for us that is a typo
        known = sorted(n for n in dir(hookspecs) if n.startswith(f"{hookspecs.PROJECT_NAME}_"))
        for caller in self.pm.get_hookcallers(obj) or []:
            if caller.spec is None:
                self._fail(
                    source,
                    "hook",
                    f"implements {caller.name}(), which is not a rankopt hook (a typo?); "
                    f"known hooks are {known}",
                )

    def _load_entry_points(self) -> None:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist
            dist_name = dist.metadata["Name"] if dist is not None else "(unknown distribution)"
            dist_version = dist.version if dist is not None else ""
            plugin_name = f"{dist_name}:{ep.name}"
            if self.pm.get_plugin(plugin_name) is not None:
                continue
            try:
                obj = ep.load()
            except Exception as exc:
                self.failures.append(
                    PluginFailure(
                        plugin_name, dist_name, dist_version, "import", f"{type(exc).__name__}: {exc}"
                    )
                )
                continue
            self._register(obj, Source(plugin_name, dist_name, dist_version, False))

    def _collect(self) -> None:
        for key, family in FAMILIES.items():
            by_name: dict[str, list[Provided]] = {}
            caller = getattr(self.pm.hook, family.hook)
            for impl in caller.get_hookimpls():
                source = self._sources.get(impl.plugin_name) or Source(
                    impl.plugin_name, "(unknown)", "", False
                )
                try:
                    records = impl.function()
                    if records is None:
                        continue
                    if isinstance(records, (PluginRecord, str, bytes, Mapping)) or not isinstance(
                        records, Iterable
                    ):
                        self._fail(
                            source,
                            "record",
                            f"{family.hook}() must return a list of {family.record_type.__name__}, "
                            f"got {type(records).__name__}",
                        )
                        continue
                    records = list(records)  # a generator may raise while it runs
                except Exception as exc:
                    self._fail(source, "hook", f"{family.hook}() raised {type(exc).__name__}: {exc}")
                    continue
                for record in records:
                    if not isinstance(record, family.record_type):
                        self._fail(
                            source,
                            "record",
                            f"{family.hook}() returned a {type(record).__name__} "
                            f"({_short(record)}), not a {family.record_type.__name__}; "
                            f"build it as {family.record_type.__name__}(name, factory, description)",
                        )
                        continue
                    by_name.setdefault(record.name, []).append(Provided(key, record, source))
            self._records[key] = by_name

    def _fail(self, source: Source, stage: str, reason: str) -> None:
        self.failures.append(
            PluginFailure(source.plugin, source.distribution, source.version, stage, reason)
        )

    # -- queries -------------------------------------------------------------------
    def names(self, family: str) -> list[str]:
        return sorted(self._records[_family(family).key])

    def provided(self, family: str) -> list[Provided]:
        """Every record of a family (duplicates included), sorted by name."""
        out = [p for ps in self._records[_family(family).key].values() for p in ps]
        return sorted(out, key=lambda p: (p.record.name, p.source.distribution))

    def conflicts(self) -> list[tuple[str, str, list[Source]]]:
        """(family, name, sources) for every name claimed by more than one plugin."""
        out = []
        for key, by_name in self._records.items():
            for name, ps in sorted(by_name.items()):
                if len(ps) > 1:
                    out.append((key, name, [p.source for p in ps]))
        return out

    def record(self, family: str, name: str) -> PluginRecord:
        fam = _family(family)
        ps = self._records[fam.key].get(name) if isinstance(name, str) else None
        if not ps:
            raise UnknownNameError(fam.label, name, self._records[fam.key])
        if len(ps) > 1:
            who = " and ".join(
                f"{p.source.plugin} ({p.source.distribution} {p.source.version})".strip()
                for p in ps
            )
            raise DuplicateNameError(
                f"{fam.label} name {name!r} is claimed by more than one plugin: {who}; "
                f"uninstall one of them or set {AUTOLOAD_ENV}=1 to use the built-ins only; "
                f"if you wrote one of these plugins, rename your {fam.label} (names are "
                "shared by every installed plugin of a family)"
            )
        return ps[0].record

    def create(self, family: str, name: str, **kwargs: Any) -> Any:
        """Look ``name`` up and call its factory."""
        return self.record(family, name).factory(**kwargs)

    def source_of(self, family: str, name: str) -> Source:
        ps = self._records[_family(family).key].get(name)
        if not ps:
            raise UnknownNameError(_family(family).label, name, self._records[_family(family).key])
        return ps[0].source


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _family(family: str) -> Family:
    """A family by key ("rank_selectors"), label ("rank selector") or "rank_selector"."""
    if family in FAMILIES:
        return FAMILIES[family]
    for f in FAMILIES.values():
        if isinstance(family, str) and family.replace("_", " ") == f.label:
            return f
    raise UnknownNameError("plugin family", family, FAMILIES)


_lock = threading.Lock()
_registry: Registry | None = None
_extra: list[Any] = []


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = Registry(extra=_extra)
        return _registry


def reset_registry() -> None:
    """Forget the registry (and in-process plugins) so the next use rebuilds it."""
    global _registry
    with _lock:
        _registry = None
        _extra.clear()


def register_plugin(plugin: Any) -> None:
    """Register an in-process plugin (a module or object with ``@hookimpl`` functions).

    Useful from notebooks and tests; packages should use the entry-point group.
    """
    global _registry
    with _lock:
        _extra.append(plugin)
        _registry = None


def lookup(family: str) -> Callable[..., Any]:
    def find(name: str, **kwargs: Any) -> Any:
        return get_registry().create(family, name, **kwargs)

    return find
