"""Build a model from a preset name, a config or a checkpoint path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..config import ModelConfig, preset
from .cut3r import Cut3r

__all__ = ["create_model"]


def create_model(spec: str | os.PathLike | ModelConfig, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, seed: Optional[int] = None) -> Cut3r:
    """A model in eval mode.

    Args:
        spec: a preset name (``cut3r_512_dpt``, ``cut3r_224_linear``, ...), a :class:`ModelConfig`,
            a config file (``.yaml`` / ``.json``), or a checkpoint path (``.pth`` / ``.safetensors``,
            loaded strictly).
        device: target device (``"meta"`` allocates nothing).
        dtype: parameter dtype.
        seed: seeds the random initialisation (presets and configs only).
    """
    if isinstance(spec, (str, os.PathLike)) and (Path(spec).suffix in (".pth", ".safetensors", ".pt")):
        from ..checkpoint import load_model

        return load_model(spec, device=device, dtype=dtype)
    if isinstance(spec, ModelConfig):
        cfg = spec
    elif Path(spec).suffix in (".yaml", ".yml", ".json"):
        cfg = ModelConfig.from_file(spec)
    else:
        cfg = preset(str(spec))
    if seed is not None:
        torch.manual_seed(seed)
    return Cut3r(cfg, device=device, dtype=dtype).optimize_memory_format().eval()
