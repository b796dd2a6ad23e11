"""Typed training config loaded from TOML with command-line overrides."""

from titan.config.job_config import JobConfig
from titan.config.manager import ConfigError, load_config

__all__ = ["ConfigError", "JobConfig", "load_config"]
