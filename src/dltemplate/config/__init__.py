"""Typed configuration: schema (the reference) and loading/validation."""

from dltemplate.config.loader import (
    apply_overrides,
    config_from_dict,
    config_keys,
    config_to_dict,
    config_to_raw,
    load_config,
    read_config,
    read_yaml,
)
from dltemplate.config.schema import (
    CallbackConfig,
    Config,
    DataConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainerConfig,
)

__all__ = [
    "CallbackConfig",
    "Config",
    "DataConfig",
    "ExperimentConfig",
    "LossConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainerConfig",
    "apply_overrides",
    "config_from_dict",
    "config_keys",
    "config_to_dict",
    "config_to_raw",
    "load_config",
    "read_config",
    "read_yaml",
]
