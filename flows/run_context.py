"""What a flow run knows about itself: its resolved RunConfig, its registry name, its id and UI page."""

from __future__ import annotations

import os
from typing import Optional

from pipeline.config import RunConfig
from pipeline.config_sources import DEFAULT_PRESET, load_run_config, preset_names


def resolve_config(config: Optional[RunConfig] = None, preset: Optional[str] = None,
                   overrides: Optional[list[str]] = None) -> RunConfig:
    """A RunConfig given directly, or a preset name / YAML path plus ``section.key=value`` overrides."""
    if config is not None:
        if overrides:
            from pipeline.config import parse_config
            from pipeline.config_sources import apply_overrides

            return parse_config(RunConfig, apply_overrides(config.model_dump(mode="json"), overrides), source="overrides")
        return config
    return load_run_config(preset or DEFAULT_PRESET, overrides or [])


def flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.get_id()


def flow_run_url() -> str | None:
    """The flow run's page in the Prefect UI (None when the UI address is unknown)."""
    from prefect.runtime import flow_run

    return flow_run.get_flow_run_ui_url()


def registry_preset(config: Optional[RunConfig], preset: Optional[str]) -> str:
    """The name models are registered under (``rnnlm-<this>``): the preset, a YAML file's stem, or ``custom``."""
    if config is not None:
        return "custom"
    name = str(preset or DEFAULT_PRESET)
    return name if name in preset_names() else os.path.splitext(os.path.basename(name))[0] or "custom"
