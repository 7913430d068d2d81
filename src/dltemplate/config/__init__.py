"""Typed configuration: schema (the reference) and loading/validation."""

from dltemplate.config.loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    read_yaml,
)
from dltemplate.config.schema import (
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
    "config_to_dict",
    "load_config",
    "read_yaml",
]
