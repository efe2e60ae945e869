"""Dotted `key=value` overrides (`--set lora.r=16`), parsed with YAML so numbers and lists come out typed."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`["lora.r=16", "lora.targets=[q,k,v]"]` -> `{"lora": {"r": 16, "targets": ["q", "k", "v"]}}`."""
    import yaml

    tree: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part} is already set to a value")
            node = child
        node[parts[-1]] = value
    return tree


def method_options(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The options addressed to `method` (`lora.r=16` for lora); options for other methods are ignored."""
    options = overrides.get(method, {})
    if not isinstance(options, dict):
        raise ConfigError(f"--set {method}=... needs a field: {method}.<option>=value")
    return dict(options)
