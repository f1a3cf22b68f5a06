"""Where results go, behind one protocol (:class:`Sink`: ``on_frame``, ``on_probe``, ``close``): files
in the output directory, the Rerun view (imported lazily), the ZeroMQ result publisher, a null sink,
and the background wrapper that keeps slow sinks off the frame loop."""

from .base import BackgroundSink, FrameEvent, NullSink, Sink, SinkStats, StreamClosed
from .files import FileSink, safe_name

__all__ = ["BackgroundSink", "FrameEvent", "NullSink", "Sink", "SinkStats", "StreamClosed", "FileSink", "safe_name"]
