"""Typed training config loaded from TOML with command-line overrides (job_config: the schema;
manager: loading, overrides, validation; checks: the checks that concern a component, written
against the sections alone so that validating imports no component)."""

from titan.config.job_config import JobConfig
from titan.config.manager import load_config

__all__ = ["JobConfig", "load_config"]
