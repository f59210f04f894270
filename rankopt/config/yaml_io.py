"""YAML for study files: the loader (safe tags, no duplicate keys, bounded alias expansion)
and the ``--set key.sub=value`` overrides of the command line."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import yaml

from rankopt.core.errors import ConfigError

__all__ = ["MAX_YAML_NODES", "load_yaml", "parse_set", "merge_set"]


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set key.sub=value`` overrides as one nested mapping; values are YAML
    (``--set trials=8``, ``--set sampler.seed=3``, ``--set 'decomposers=[svd]'``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(
                f"--set must be key=value with a dotted key (e.g. trials=8, sampler.seed=3), got {item!r}"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r} conflicts with another --set of {part!r}")
            node = child
        node[parts[-1]] = value
    return out


def merge_set(raw: dict[str, Any], sets: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with ``sets`` merged in at every depth (a value replaces, a mapping merges)."""
    merged = copy.deepcopy(raw)
    for key, value in sets.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_set(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


MAX_YAML_NODES = 100_000  # a study file is a few hundred nodes; aliases can expand to billions


class _StudyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (YAML's last-wins would silently drop
    a setting) and documents whose aliases expand beyond :data:`MAX_YAML_NODES` nodes
    (the "billion laughs": a few lines that validation and error messages would expand)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # YAML 1.1 reads the keys on/off/yes/no/y/n as booleans: `reference: {on: cluster}`
        # would be {True: 'cluster'}. A key written so is the word (values keep YAML's rule)
        node.value = [(_word_key(k), v) for k, v in node.value]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each setting may appear once)",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-untyped-call]


_BOOL_TAG = "tag:yaml.org,2002:bool"


def _word_key(key: yaml.Node) -> yaml.Node:
    if isinstance(key, yaml.ScalarNode) and key.tag == _BOOL_TAG and key.style is None:
        return yaml.ScalarNode("tag:yaml.org,2002:str", key.value, key.start_mark, key.end_mark)
    return key


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes in ``node`` with every alias expanded (memoized: aliases share their node)."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once (and then fails construction)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = total
    return total


def load_yaml(text: str) -> Any:
    """The YAML document in ``text`` (safe tags only, no duplicate keys, bounded size)."""
    loader = _StudyLoader(text)
    try:
        node = loader.get_single_node()  # type: ignore[no-untyped-call]
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"the document expands to {size:,} values through its aliases (&/*); at most "
                f"{MAX_YAML_NODES:,} are allowed"
            )
        return loader.construct_document(node)  # type: ignore[no-untyped-call]
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]

