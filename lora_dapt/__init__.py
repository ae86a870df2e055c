"""lora_dapt: domain-adaptive continued pre-training with LoRA/QLoRA."""

from .config import (
    AdapterConfig,
    DataConfig,
    EvalConfig,
    MergeConfig,
    ModelConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
)
from .errors import ConfigError, DataError, LoraDaptError, MergeError, ModelLoadError, TrainingError

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "ConfigError",
    "DataConfig",
    "DataError",
    "EvalConfig",
    "LoraDaptError",
    "MergeConfig",
    "MergeError",
    "ModelConfig",
    "ModelLoadError",
    "RunConfig",
    "SFTConfig",
    "TrainConfig",
    "TrainingError",
]
