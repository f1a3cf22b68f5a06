"""Model weights shipped inside the package.

``streamrecon_small.safetensors`` (+ ``.json`` config) is our own model of the CUT3R architecture
(preset ``streamrecon_small``), trained only on the synthetic scenes of ``streamrecon.synth``
(Apache-2.0, like the code). It is the default of ``streamrecon run``, ``demo`` and ``eval``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional

__all__ = ["bundled_weights", "BUNDLED_NAME"]

BUNDLED_NAME = "streamrecon_small.safetensors"


def bundled_weights() -> Optional[Path]:
    """Path of the bundled model, or ``None`` if this installation has none."""
    path = Path(str(resources.files(__name__) / BUNDLED_NAME))
    return path if path.is_file() else None
