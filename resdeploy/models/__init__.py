"""Residual network definitions, registry, safe checkpoints, packaged data and a small trainer."""

from resdeploy.models.base import ResidualNet
from resdeploy.models.blocks import ResBlock, conv_layer
from resdeploy.models.checkpoint import CheckpointInfo, load_checkpoint, read_state_dict, save_checkpoint
from resdeploy.models.data import DataBundle, Split, load_data, normalize
from resdeploy.models.registry import create_model, describe, list_models
from resdeploy.models.spec import InputSpec, ModelCard, ResidualBlockInfo, ShortPathInfo

__all__ = [
    "CheckpointInfo", "DataBundle", "InputSpec", "ModelCard", "ResBlock", "ResidualBlockInfo", "ResidualNet", "Split",
    "conv_layer", "create_model", "describe", "list_models", "load_checkpoint", "load_data", "normalize",
    "read_state_dict", "save_checkpoint", "ShortPathInfo",
]
