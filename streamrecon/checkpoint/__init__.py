"""Checkpoint reading (safe ``.pth`` unpickling, ``.safetensors``), strict loading, conversion."""

from .info import CheckpointInfo
from .io import (
                 Checkpoint,
                 CheckpointError,
                 CheckpointMismatchError,
                 alias_groups,
                 convert_checkpoint,
                 load_model,
                 load_model_info,
                 load_state_dict_strict,
                 read_checkpoint,
                 write_safetensors,
)
from .safe_pickle import UnsafeCheckpointError, load_pth, to_plain

__all__ = [
    "Checkpoint", "CheckpointError", "CheckpointMismatchError", "UnsafeCheckpointError", "alias_groups",
    "convert_checkpoint", "load_model", "load_model_info", "CheckpointInfo", "load_state_dict_strict", "read_checkpoint",
    "write_safetensors",
    "load_pth", "to_plain",
]
