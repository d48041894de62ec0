"""Params files: typed schema, strict loading, ``--set`` overrides, resolved-config output."""

from lmfab.config.check import check_config, micro_batching
from lmfab.config.errors import ConfigError
from lmfab.config.load import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    read_yaml,
    write_config,
)
from lmfab.config.schema import (
    Config,
    EvalInputConfig,
    KernelsConfig,
    LRSegment,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ProfileConfig,
    RunConfig,
    TrainInputConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "EvalInputConfig",
    "KernelsConfig",
    "LRSegment",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "ProfileConfig",
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
