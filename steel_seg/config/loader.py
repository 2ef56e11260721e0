"""Read experiment YAML: `_base_` inheritance, `--set` overrides, and where every key came from.

Provenance matters because a typo three `_base_` files deep should be reported in the file and
line where it was written, not in the file the user ran.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Origins = dict[tuple[str, ...], str]
BASE_KEY = "_base_"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file, line and key."""


@dataclass
class RawConfig:
    """Merged YAML data plus, for every key path, "file:line" (or "--set ...") that set it."""

    data: dict[str, Any]
    origins: Origins = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def origin(self, path: tuple[str, ...]) -> str | None:
        """The most specific recorded origin for `path` or one of its parents."""
        for n in range(len(path), 0, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
        return None


def _node_to_python(node: yaml.Node, path: tuple[str, ...], file: Path, origins: Origins) -> Any:
    """Convert a composed YAML node, recording the line of every mapping key."""
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            if not isinstance(key, str):
                raise ConfigError(
                    f"{file}:{key_node.start_mark.line + 1}: keys must be strings, got {key!r}"
                )
            if key in out:
                raise ConfigError(f"{file}:{key_node.start_mark.line + 1}: duplicate key `{key}`")
            origins[path + (key,)] = f"{file}:{key_node.start_mark.line + 1}"
            out[key] = _node_to_python(value_node, path + (key,), file, origins)
        return out
    # Scalars and sequences: let PyYAML's safe constructor decide types.
    return yaml.safe_load(yaml.serialize(node))


def _read_yaml(path: Path) -> tuple[dict[str, Any], Origins]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if node is None:
        return {}, {}
    origins: Origins = {}
    data = _node_to_python(node, (), path, origins)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data, origins


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge `override` into a copy of `base`; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _merge_origins(base: Origins, override: Origins, override_data: dict[str, Any]) -> Origins:
    """Origins after deep_merge: a replaced (non-mapping) value drops its base sub-keys."""
    merged = dict(base)
    for path, origin in override.items():
        value: Any = override_data
        for part in path:
            value = value[part]
        if not isinstance(value, dict):
            merged = {p: o for p, o in merged.items() if p[: len(path)] != path}
        merged[path] = origin
    return merged


def load_yaml_tree(path: str | Path, _chain: tuple[Path, ...] = ()) -> RawConfig:
    """Load `path` and its `_base_` files (a path or list, relative to the including file)."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in _chain + (resolved,))
        raise ConfigError(f"`_base_` cycle: {cycle}")
    data, origins = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    origins = {p: o for p, o in origins.items() if p[0] != BASE_KEY}
    if bases is None:
        return RawConfig(data, origins, [path])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: `_base_` must be a path or a list of paths, got {bases!r}")

    merged = RawConfig({}, {}, [])
    for base in bases:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.exists():
            raise ConfigError(f"{path}: `_base_` file not found: {base} (looked at {base_path})")
        parent = load_yaml_tree(base_path, _chain + (resolved,))
        merged = RawConfig(
            deep_merge(merged.data, parent.data),
            _merge_origins(merged.origins, parent.origins, parent.data),
            merged.files + parent.files,
        )
    return RawConfig(
        deep_merge(merged.data, data),
        _merge_origins(merged.origins, origins, data),
        merged.files + [path],
    )


def apply_overrides(raw: RawConfig, overrides: list[str]) -> RawConfig:
    """Apply `key.path=value` strings (values parsed as YAML: `3`, `true`, `[1, 2]`, `UNet`)."""
    data, origins = copy.deepcopy(raw.data), dict(raw.origins)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
        path = tuple(key.strip().split("."))
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                dotted = ".".join(path[: i + 1])
                raise ConfigError(f"--set {item!r}: `{dotted}` is a value, not a section")
            node = child
        node[path[-1]] = value
        origins = {p: o for p, o in origins.items() if p[: len(path)] != path}
        origins[path] = f"--set {item}"
    return RawConfig(data, origins, raw.files)
