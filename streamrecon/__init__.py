"""streamrecon: online, streaming 3D reconstruction with a checkpoint-exact CUT3R.

Importing the package is cheap: heavy or optional modules (rerun, zmq, cv2) load only where used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import PRESETS, ModelConfig, preset
from .types import FrameInput, StepOutput, StreamState

__all__ = [
    "__version__", "PRESETS", "ModelConfig", "preset", "FrameInput", "StepOutput", "StreamState",
    "Cut3r", "load_model", "create_model", "CUT3R_RULE", "UpdateRule",
]


def __getattr__(name: str):
    if name in ("Cut3r", "CUT3R_RULE", "UpdateRule"):
        from . import models

        return getattr(models, name)
    if name == "load_model":
        from .checkpoint import load_model

        return load_model
    if name == "create_model":
        from .models.factory import create_model

        return create_model
    raise AttributeError(f"module 'streamrecon' has no attribute {name!r}")
