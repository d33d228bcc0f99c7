"""Where run configurations come from: bundled presets, YAML files and ``section.key=value`` overrides.

    cfg = load_run_config("timemachine-char", ["train.epochs=3"])

A preset is ``pipeline/presets/<name>.yaml``; anything else that looks like a path
(or fsspec URL) is read as YAML (or JSON, a subset of YAML). Override values are parsed
as YAML. The result is validated by ``pipeline.config.parse_config`` against its schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.config import C, RunConfig, parse_config
from pipeline.errors import ConfigError

DEFAULT_PRESET = "timemachine-char"


def preset_names() -> list[str]:
    from importlib import resources

    return sorted(p.name[: -len(".yaml")] for p in (resources.files("pipeline") / "presets").iterdir() if p.name.endswith(".yaml"))


def read_raw(name_or_path: str | Path) -> dict[str, Any]:
    """The raw mapping of a preset name (``timemachine-char``) or a YAML path/URL."""
    from importlib import resources

    import fsspec

    text = str(name_or_path)
    if text in preset_names():
        url = str(resources.files("pipeline") / "presets" / f"{text}.yaml")
    elif "/" in text or "\\" in text or text.endswith((".yaml", ".yml", ".json")):
        url = text
    else:
        raise ConfigError(f"unknown preset {text!r}; presets: {', '.join(preset_names())} (or give a YAML path)")
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {url}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {url} is not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {url} must hold a mapping, got {type(raw).__name__}")
    return raw or {}


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides or ())
    merged = json_roundtrip(raw)
    for dotted, value in items:
        node = merged
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
            node = child
        node[leaf] = value
    return merged


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    return key.strip(), yaml.safe_load(value)


def json_roundtrip(raw: dict[str, Any]) -> dict[str, Any]:
    import json

    return json.loads(json.dumps(raw, default=list))


def load_run_config(name_or_path: str | Path = DEFAULT_PRESET, overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """A validated RunConfig from a preset name or YAML file, plus ``section.key=value`` overrides."""
    return parse_config(RunConfig, apply_overrides(read_raw(name_or_path), overrides), source=str(name_or_path))


def load_config(cls: type[C], url: str | Path) -> C:
    """Read and validate a YAML (or JSON, a subset of YAML) file from a path or fsspec URL."""
    return parse_config(cls, read_raw(url), source=str(url))
