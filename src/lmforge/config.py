"""Configs are dataclasses; YAML files mirror them; `a.b=c` overrides on the command line.

Strict on purpose: an unknown key or a value of the wrong type is an error that names the key, the
file, and what is allowed — a typo never silently falls back to a default.

    cfg = load_config(PretrainConfig, "configs/pretrain/x.yaml", ["train.lr=3e-4", "run.name=try2"])
    text = to_yaml(cfg)      # the resolved config, written to runs/<name>/config.yaml
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config problem a user can fix; the message says where and how."""


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple = ()):
    """Build `cls` from a YAML file (optional) and `key.sub=value` overrides (YAML-parsed values)."""
    data, source = {}, "defaults"
    if path is not None:
        path, source = Path(path), str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    return from_dict(cls, data, source)


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw) if raw.strip() else ""


def from_dict(cls, data: dict, source: str = "config", prefix: str = ""):
    """A dataclass instance from a nested dict, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix + unknown[0]!r}; allowed keys in "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}")
    values = {k: _convert(v, hints[k], source, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {e}") from None


def _convert(value: Any, hint, source: str, key: str):
    """Check `value` against the type hint; returns the (possibly converted) value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, source, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} = {value!r} is not allowed; choose one of: "
                              f"{', '.join(map(str, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single value where a list is expected: `targets: q_proj`
        return [_convert(v, args[0] if args else Any, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return value
    return _scalar(value, hint, source, key)


def _scalar(value, hint, source, key):
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads `3e-4` as a string
        except ValueError:
            pass
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {hint.__name__}, got {value!r}")
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    """The resolved config as YAML, in field order (loads back to an equal config)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
