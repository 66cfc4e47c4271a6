"""Typed, validated configuration loaded from YAML with command-line overrides."""

from transfer.config.loader import (
    build_section,
    config_from_dict,
    config_to_dict,
    describe_options,
    dump_config,
    first_non_name_key,
    load_config,
    option,
    parse_overrides,
    read_config_tree,
    read_yaml_mapping,
)
from transfer.config.schema import (
    DataConfig,
    LogConfig,
    LossConfig,
    ModelConfig,
    NCEConfig,
    SamplerConfig,
    TeacherConfig,
    TeacherRefConfig,
    TrainConfig,
    TransferConfig,
)

__all__ = [
    "DataConfig", "LogConfig", "LossConfig", "ModelConfig", "NCEConfig", "SamplerConfig", "TeacherConfig",
    "TeacherRefConfig", "TrainConfig", "TransferConfig",
    "build_section", "config_from_dict", "config_to_dict", "describe_options", "dump_config", "first_non_name_key",
    "load_config", "option", "parse_overrides", "read_config_tree", "read_yaml_mapping",
]
