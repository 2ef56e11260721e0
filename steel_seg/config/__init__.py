"""Experiment configs: load YAML (with `_base_` and `--set`), validate, explain mistakes."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from steel_seg.config.loader import ConfigError, RawConfig, apply_overrides, load_yaml_tree
from steel_seg.config.schema import ExperimentConfig

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "load_experiment",
    "validate_experiment",
    "dump_config",
]


def _section_class(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The schema class that holds the keys at `path`, or None if that is no section."""
    cls: type[BaseModel] = ExperimentConfig
    for part in path:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        cls = nested[0]
    return cls


# Names users bring from other tools that string similarity would not find.
KEY_ALIASES = {
    "lr": "learning_rate",
    "base_lr": "learning_rate",
    "bs": "batch_size",
    "num_epochs": "epochs",
    "iters": "epochs",
    "input_size": "size",
    "crop_size": "size",
}


def suggest_key(path: tuple[str | int, ...]) -> str:
    """' did you mean `x`?' for an unknown key, or the list of valid keys."""
    cls = _section_class(path[:-1])
    if cls is None:
        return ""
    valid = list(cls.model_fields)
    alias = KEY_ALIASES.get(str(path[-1]))
    if alias in valid:
        return f"; did you mean `{alias}`?"
    close = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean `{close[0]}`?"
    return f"; valid keys here: {', '.join(valid)}"


def _format_errors(exc: ValidationError, raw: RawConfig, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        # Drop pydantic's union-branch markers (e.g. 'bool', 'list[...]') from the key path.
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p == "bool")))
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        str_loc = tuple(str(p) for p in loc)
        origin = raw.origin(str_loc) or "default"
        if err["type"] == "extra_forbidden":
            message = f"unknown key `{loc[-1]}`{suggest_key(loc)}"
        else:
            message = err["msg"]
            if "input" in err and not isinstance(err["input"], dict):
                message += f" (got {err['input']!r})"
        lines.append(f"  - {dotted} ({origin}): {message}")
    return "\n".join(lines)


def validate_experiment(raw: RawConfig, source: str = "config") -> ExperimentConfig:
    """Validate merged YAML data; errors name key, file and line, and suggest the right key."""
    try:
        return ExperimentConfig.model_validate(raw.data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, raw, source)) from None


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load, merge, override and validate one experiment file."""
    raw = apply_overrides(load_yaml_tree(path), list(overrides))
    config = validate_experiment(raw, source=str(path))
    if config.name is None:
        config = config.model_copy(update={"name": Path(path).stem})
    return config


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML, loadable again by `load_experiment`."""
    data = config.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
