"""Params files: typed schema, strict loading, ``--set`` overrides, resolved-config output."""

from lmfab.config.errors import ConfigError
from lmfab.config.load import (
    apply_overrides,
    check_config,
    config_from_dict,
    config_to_dict,
    load_config,
    micro_batching,
    read_yaml,
    write_config,
)
from lmfab.config.schema import (
    Config,
    EvalInputConfig,
    LRSegment,
    ModelConfig,
    OptimizerConfig,
    RunConfig,
    TrainInputConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "EvalInputConfig",
    "LRSegment",
    "ModelConfig",
    "OptimizerConfig",
    "RunConfig",
    "TrainInputConfig",
    "apply_overrides",
    "check_config",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "micro_batching",
    "read_yaml",
    "write_config",
]
