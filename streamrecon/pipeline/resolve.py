"""One resolver for what every command needs before the first frame: the device, the weights (a path
or the bundled model), the loaded model with its :class:`CheckpointInfo`, and the map's confidence
threshold (given, else the checkpoint's recommendation, else the reference demo's 1.5)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..checkpoint.info import CheckpointInfo
from ..mapping.voxel_map import DEFAULT_CONF_THRESH  # 1.5, the reference demo's value (official checkpoints)

if TYPE_CHECKING:
    from ..models import Cut3r
    from ..settings import EngineSettings

__all__ = ["LoadedModel", "resolve_device", "resolve_weights", "resolve_conf_thresh", "load_resolved",
           "DEFAULT_CONF_THRESH"]

_logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class LoadedModel:
    """A model and where it came from (shared by every stream of a node)."""

    model: "Cut3r"
    info: CheckpointInfo

    @classmethod
    def wrap(cls, model: "Cut3r | LoadedModel", info: Optional[CheckpointInfo] = None) -> "LoadedModel":
        """An already built model (tests, embedding) with what is known of it."""
        if isinstance(model, LoadedModel):
            return model
        return cls(model, info or CheckpointInfo())


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; a CUDA device without CUDA is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return name


def resolve_weights(weights: Optional[str]) -> tuple[Path, bool]:
    """``(path, bundled)``: the given checkpoint, else the bundled model (with a warning)."""
    if weights:
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.is_dir():
            raise FileNotFoundError(f"--weights {path} is a folder; give the checkpoint file (.pth or .safetensors)")
        return path, False
    from ..weights import bundled_weights

    path = bundled_weights()
    if path is None:
        raise FileNotFoundError("no --weights given and this installation has no bundled model")
    _logger.warning("no --weights given: using the bundled model %s (trained on synthetic scenes)", path.name)
    return path, True


def resolve_conf_thresh(info: Optional[CheckpointInfo], value: Optional[float] = None) -> float:
    """``value`` when given, else the threshold the checkpoint recommends, else 1.5.

    Raises:
        SettingsError: ``value`` is NaN (no point would pass it: the map would stay empty).
        CheckpointError: no ``value`` and the checkpoint's recommendation is not a finite number.
    """
    if value is not None:
        value = float(value)
        if math.isnan(value):
            from ..settings import SettingsError

            raise SettingsError("--conf-thresh must be a number, got nan (no point would pass it)")
        return value
    recommended = info.conf_thresh if info is not None else None
    return DEFAULT_CONF_THRESH if recommended is None else recommended


def load_resolved(engine: "EngineSettings") -> LoadedModel:
    """Load the model the settings name (or the bundled one) on the resolved device."""
    from ..checkpoint import load_model_info

    path, bundled = resolve_weights(engine.weights)
    # int8 runs on the CPU only: --device auto on a GPU machine means the CPU for it
    device = "cpu" if engine.precision == "int8" and engine.device == "auto" else resolve_device(engine.device)
    model, info = load_model_info(path, device=device, bundled=bundled)
    return LoadedModel(model, info)
