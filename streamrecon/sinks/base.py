"""The sink protocol, the events sinks receive, a null sink, and the background wrapper.

A sink sees three things, in order, from one pipeline: ``on_frame(FrameEvent)`` per processed frame,
``on_probe(ProbeResult)`` per raymap probe, and ``close(StreamClosed)`` once. Events are frozen and
shared between sinks: a sink never modifies what it receives.

Slow sinks run behind :class:`BackgroundSink`: the frame loop only enqueues; a worker thread does the
work. With ``drop=False`` (files) a full queue makes the loop wait -- nothing is ever lost; with
``drop=True`` (the viewer) frame events that do not fit are dropped and counted. Probes and the
close event are never dropped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from ..frames import FrameResult, ProbeResult

__all__ = ["FrameEvent", "StreamClosed", "Sink", "NullSink", "BackgroundSink", "SinkStats"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameEvent:
    """One processed frame as the pipeline hands it to its sinks.

    Attributes:
        stream_id: the stream's name (``run``: the source's name).
        result: the engine's :class:`FrameResult` (not modified by anyone downstream).
        new_points: ``(M, 3)`` float32 world points of the map voxels this frame created.
        new_colors: ``(M, 3)`` uint8 their colours.
        map_points: size of the map after this frame.
        metrics: scalars for display (fps, map size, latency, ...).
        map_snapshot: ``(xyz (N, 3) float32, rgb (N, 3) uint8)`` of the whole map when a consolidation
            is due (every ``consolidate_every`` frames), else ``None``.
        summary: the running summary (a dict) when a periodic flush is due, else ``None``.
        context: what the caller knew of the frame beyond the result (``serve``: ``recv_ns``,
            ``stamp_ns`` of the wire message), passed through untouched.
        preview: ``(h, w, 3)`` uint8 RGB: the frame as the camera gave it, downscaled to a long side of at
            most :data:`PREVIEW_LONG_SIDE` (only when a viewer sink is attached, else ``None``).
        map_files: ``(xyz, rgb, conf, poses)`` the whole map and the trajectory so far (``(F, 4, 4)``
            ``T_wc``) when a periodic map write is due (``--map-every-s``), else ``None``; file sinks
            rewrite ``map.ply`` / ``map.glb`` from it, so a killed process leaves a recent map.
        image: ``(H, W, 3)`` uint8 RGB, the frame at full resolution as the engine got it (undistorted with
            a calibration) -- only when a sink asks for it (``wants_image``, e.g. ``--export colmap``).
        dense: ``--network-every``: the network's results (:class:`FrameResult` with ``network=True``,
            their own ``index``) that arrived since the previous frame, each already in the map; the
            ``result`` of such a stream is then usually a pose-only one (``network=False``).
        loop: when a loop closure was applied just before this frame (``--backend slam``):
            ``{"edges": (E, 2, 3) float32 keyframe positions of every loop edge so far,
            "keyframes": (K, 3) float32 corrected keyframe positions, "edge": (i, j, inliers)}``.
    """

    stream_id: str
    result: FrameResult
    new_points: np.ndarray
    new_colors: np.ndarray
    map_points: int
    metrics: dict[str, float] = field(default_factory=dict)
    map_snapshot: Optional[tuple[np.ndarray, np.ndarray]] = None
    summary: Optional[dict[str, Any]] = None
    context: dict[str, Any] = field(default_factory=dict)
    loop: Optional[dict[str, Any]] = None
    preview: Optional[np.ndarray] = None
    map_files: Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = None
    image: Optional[np.ndarray] = None
    dense: tuple[FrameResult, ...] = ()

    def dense_results(self) -> tuple[FrameResult, ...]:
        """Every result with pixels this event carries: ``result`` when the network saw it, then ``dense``."""
        return ((self.result,) if self.result.network else ()) + tuple(self.dense)


#: long side (pixels) of the original frame handed to viewer sinks
PREVIEW_LONG_SIDE = 640


def preview_image(image: np.ndarray, long_side: int = PREVIEW_LONG_SIDE) -> np.ndarray:
    """``image`` ``(H, W, 3)`` uint8, downscaled (area) so that its long side is at most ``long_side``."""
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    if scale >= 1.0:
        return image
    import cv2

    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class StreamClosed:
    """The end of a stream: everything a sink needs to write its final outputs.

    Attributes:
        stream_id: the stream's name.
        summary: the final summary as a dict (``RunSummary.to_dict()``).
        map_xyz, map_rgb, map_conf: the global map ``(N, 3)`` float32, ``(N, 3)`` uint8, ``(N,)`` float32.
        stamps: ``(F,)`` capture times; poses: ``(F, 4, 4)`` camera-to-world ``T_wc``, global frame.
        keyframes: ``(stamps (K,), S_wk (K, 4, 4))`` the SLAM backend's keyframe poses after its
            last optimisation (``None`` without it).
        optimized: ``(F, 4, 4)`` with loop closures: every frame's pose moved with its keyframe after
            the last optimisation (``None`` when no loop was closed).
        refined: ``--refine``'s outputs: ``{"stamps", "poses" (F, 4, 4), "map_xyz", "map_rgb",
            "map_conf", "stats"}`` (``None`` without it).
        dense: ``--network-every``: network results that arrived after the last frame (already in the map).
    """

    stream_id: str
    summary: dict[str, Any]
    map_xyz: np.ndarray
    map_rgb: np.ndarray
    map_conf: np.ndarray
    stamps: np.ndarray
    poses: np.ndarray
    keyframes: Optional[tuple] = None
    refined: Optional[dict] = None
    optimized: Optional[np.ndarray] = None
    dense: tuple[FrameResult, ...] = ()


@runtime_checkable
class Sink(Protocol):
    """Where results go. ``name`` appears in the summary's per-sink figures."""

    name: str

    def on_frame(self, event: FrameEvent) -> None: ...

    def on_probe(self, probe: ProbeResult) -> None: ...

    def close(self, final: StreamClosed) -> None: ...


class NullSink:
    """Receives everything, does nothing (benchmarks, embedding with a callback only)."""

    name = "null"

    def on_frame(self, event: FrameEvent) -> None:
        pass

    def on_probe(self, probe: ProbeResult) -> None:
        pass

    def close(self, final: StreamClosed) -> None:
        pass


@dataclass
class SinkStats:
    """Per-sink figures: events handled, dropped (viewer only), failed; busy time; queue high-water mark."""

    frames: int = 0
    dropped: int = 0
    errors: int = 0
    busy_ms: float = 0.0
    queue_max: int = 0
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "dropped": self.dropped, "errors": self.errors,
                "busy_ms": round(self.busy_ms, 3), "queue_max": self.queue_max, "last_error": self.last_error}


_STOP = object()


class BackgroundSink:
    """Runs ``inner`` on a worker thread behind a bounded queue.

    Args:
        inner: the sink doing the work.
        maxsize: events that may wait.
        drop: drop frame events when the queue is full (viewer) instead of waiting (files).
    """

    def __init__(self, inner: Sink, maxsize: int = 64, drop: bool = False) -> None:
        self.inner, self.drop = inner, drop
        self.name = inner.name
        self.stats = SinkStats()
        self._q: queue.Queue = queue.Queue(maxsize=maxsize)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"sink-{inner.name}", daemon=True)
        self._thread.start()

    def _call(self, fn, arg) -> None:
        t0 = time.perf_counter()
        try:
            fn(arg)
        except Exception as e:  # a failing sink must not stop the stream or the other sinks
            self.stats.errors += 1
            self.stats.last_error = f"{type(e).__name__}: {e}"
            _logger.error("sink %s: %s", self.name, self.stats.last_error)
        finally:
            self.stats.busy_ms += 1e3 * (time.perf_counter() - t0)

    def _work(self) -> None:
        while True:
            kind, item = self._q.get()
            if kind is _STOP:
                return
            if kind == "frame":
                self._call(self.inner.on_frame, item)
                self.stats.frames += 1
            elif kind == "probe":
                self._call(self.inner.on_probe, item)
            elif kind == "close":
                self._call(self.inner.close, item)
            elif kind == "flush":
                on_flush = getattr(self.inner, "on_flush", None)
                if on_flush is not None:
                    self._call(lambda args, f=on_flush: f(*args), item)
            elif kind == "resume":
                on_resume = getattr(self.inner, "on_resume", None)
                if on_resume is not None:
                    self._call(lambda args, f=on_resume: f(*args), item)

    def _put(self, kind: str, item: Any, droppable: bool) -> None:
        if self._closed:
            raise RuntimeError(f"sink {self.name} is closed")
        if droppable and self.drop:
            try:
                self._q.put_nowait((kind, item))
            except queue.Full:
                self.stats.dropped += 1
                return
        else:
            self._q.put((kind, item))
        self.stats.queue_max = max(self.stats.queue_max, self._q.qsize())

    def on_frame(self, event: FrameEvent) -> None:
        self._put("frame", event, droppable=True)

    def on_probe(self, probe: ProbeResult) -> None:
        self._put("probe", probe, droppable=False)

    def on_resume(self, stamps: np.ndarray, poses: np.ndarray) -> None:
        """The stream continues from a snapshot: its trajectory so far (for sinks that keep one)."""
        self._put("resume", (stamps, poses), droppable=False)

    def on_flush(self, summary: dict, map_files: Optional[tuple]) -> None:
        """A periodic flush between frames (:meth:`StreamPipeline.flush_if_due`), for sinks that keep files
        (only those get it: a viewer's full queue must never hold up the caller)."""
        if getattr(self.inner, "on_flush", None) is not None:
            self._put("flush", (summary, map_files), droppable=True)

    def abandon(self) -> None:
        """Stop the worker after what is queued, without the final event (nothing more is written)."""
        if not self._closed:
            self._closed = True
            self._q.put((_STOP, None))
            self._thread.join()

    def close(self, final: StreamClosed) -> None:
        """Hand over the final event, wait until everything queued is done."""
        self._put("close", final, droppable=False)
        self._closed = True
        self._q.put((_STOP, None))
        self._thread.join()
