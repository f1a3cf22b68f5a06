"""streamrecon: online, streaming 3D reconstruction with a checkpoint-exact CUT3R.

Importing the package is cheap and torch-free: every name below is loaded on first use, so the
wire codec (``streamrecon.wire``) works in bridges that have no torch installed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "PRESETS": "config", "ModelConfig": "config", "preset": "config",
    "FrameInput": "types", "StepOutput": "types", "StreamState": "types",
    "Cut3r": "models", "CUT3R_RULE": "models", "UpdateRule": "models",
    "load_model": "checkpoint", "create_model": "models.factory",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamrecon' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
