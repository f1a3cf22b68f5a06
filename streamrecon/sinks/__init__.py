"""Where results go: files in the output directory, and the Rerun view (imported lazily)."""

from .files import OutputWriter

__all__ = ["OutputWriter"]
