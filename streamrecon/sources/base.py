"""The frame-source interface: anything that yields :class:`~streamrecon.engine.Frame` objects."""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

from ..frames import Frame

__all__ = ["FrameSource", "SourceStats", "SourceError"]


class SourceError(RuntimeError):
    """A source that cannot be opened or read at all (missing file, unreadable video, no camera)."""


@dataclass
class SourceStats:
    """Counters of a source (thread-safe increments through :meth:`add`).

    Attributes:
        read: frames obtained from the device/file.
        delivered: frames handed to the consumer.
        dropped: frames discarded because a newer one arrived first (live sources).
        errors: frames that could not be decoded (skipped).
        last_error: text of the most recent error.
    """

    read: int = 0
    delivered: int = 0
    dropped: int = 0
    errors: int = 0
    last_error: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def error(self, message: str) -> None:
        with self._lock:
            self.errors += 1
            self.last_error = message

    def as_dict(self) -> dict:
        return {"read": self.read, "delivered": self.delivered, "dropped": self.dropped, "errors": self.errors,
                "last_error": self.last_error}


class FrameSource(abc.ABC):
    """A stream of frames.

    Attributes:
        name: stream name (used as ``Frame.source``).
        live: True when frames arrive in real time and the newest wins (older ones are dropped);
            False for lossless sources (files), which deliver every frame in order.
        stats: counters.
    """

    name: str = ""
    live: bool = False

    def __init__(self) -> None:
        self.stats = SourceStats()

    @abc.abstractmethod
    def frames(self) -> Iterator[Frame]:
        """Yield frames until the source ends or :meth:`close` is called."""

    def __iter__(self) -> Iterator[Frame]:
        for frame in self.frames():
            self.stats.add(delivered=1)
            yield frame

    def __len__(self) -> int:
        n = self.expected_frames()
        if n is None:
            raise TypeError(f"{type(self).__name__} has no known length")
        return n

    def expected_frames(self) -> Optional[int]:
        """Number of frames the source will deliver, if known (files)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most sources have nothing to release
        """Release the device/file; idempotent."""

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
