"""What is known about the checkpoint a model came from (a typed object that travels beside the model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

__all__ = ["CheckpointInfo"]


@dataclass(frozen=True)
class CheckpointInfo:
    """Attributes:
        path: the checkpoint file (``None`` for a model built in memory).
        format: ``pth``, ``safetensors`` or ``memory``.
        bundled: whether it is the model shipped inside the package.
        meta: the checkpoint's metadata strings (safetensors metadata, or ``epoch`` etc. for ``.pth``).
    """

    path: Optional[str] = None
    format: str = "memory"
    bundled: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def conf_thresh(self) -> Optional[float]:
        """The map confidence threshold the checkpoint recommends (metadata ``conf_thresh``), if any."""
        value = self.meta.get("conf_thresh")
        try:
            return None if value is None else float(value)
        except (TypeError, ValueError):
            return None

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "bundled": self.bundled,
                "recommended_conf_thresh": self.conf_thresh}
