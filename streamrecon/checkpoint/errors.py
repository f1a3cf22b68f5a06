"""The checkpoint error class, in its own module so that every reader (``.pth``, ``.safetensors``,
metadata) can raise it without import cycles."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, no config, wrong format, hostile content)."""
