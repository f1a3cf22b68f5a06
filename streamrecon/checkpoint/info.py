"""What is known about the checkpoint a model came from (a typed object that travels beside the model)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .errors import CheckpointError

__all__ = ["CheckpointInfo", "parse_conf_thresh"]

_logger = logging.getLogger(__name__)


def parse_conf_thresh(value: Any, where: str = "checkpoint metadata") -> Optional[float]:
    """A recommended map threshold as a float; ``None`` when absent.

    Raises:
        CheckpointError: not a number, or not finite (``"nan"``, ``"inf"``, ``"-inf"``): a NaN or
            infinite threshold would silently keep no point (or every point) of the map, so it is
            an error rather than a fallback to the default.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise CheckpointError(f"{where}: conf_thresh must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{where}: conf_thresh must be a number, got {str(value)[:60]!r}") from None
    if not math.isfinite(number):
        raise CheckpointError(f"{where}: conf_thresh must be a finite number, got {str(value)[:60]!r} "
                              "(it would empty the map); fix the metadata or give --conf-thresh")
    return number


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
        """The map confidence threshold the checkpoint recommends (metadata ``conf_thresh``), if any.

        Raises:
            CheckpointError: the metadata holds a non-number or a non-finite value (see
                :func:`parse_conf_thresh`); only consulted when no threshold is given.
        """
        return parse_conf_thresh(self.meta.get("conf_thresh"), f"{self.path or 'checkpoint'} metadata")

    def describe(self) -> dict[str, Any]:
        """Plain description for reports (an invalid recommendation shows as ``None``)."""
        try:
            recommended = self.conf_thresh
        except CheckpointError as e:
            _logger.debug("%s", e)
            recommended = None
        return {"path": self.path, "format": self.format, "bundled": self.bundled,
                "recommended_conf_thresh": recommended}
