"""One stream inside the node: its pipeline (engine, map, trajectory, sinks), queue and counters."""

from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..fileio import atomic_write_text, confine
from ..mapping import write_tum
from ..pipeline import StreamPipeline
from ..sinks.files import write_map_files
from ..sinks.zmq_results import ResultPublisher
from ..wire import FrameMessage

__all__ = ["StreamSession", "Pending"]


@dataclass
class Pending:
    """A received, validated, not yet decoded frame and where its acknowledgement goes."""

    msg: FrameMessage
    recv_ns: int
    reply_to: Optional[list] = None  # ROUTER envelope for a deferred ack (lossless / REQ peers)
    image: Optional[np.ndarray] = None  # already decoded (the frame that opened the stream)


@dataclass
class StreamSession:
    """State of one ``stream_id`` (owned by the node's loop thread).

    Attributes:
        pipeline: the stream's :class:`StreamPipeline` (engine, map, trajectory, file/viewer sinks).
        publisher: its result publisher (also one of the pipeline's sinks).
        lossless: deliver every frame in order (acks when processed) instead of newest-wins.
        queue: frames waiting; live streams keep only the newest one.
    """

    stream_id: str
    pipeline: StreamPipeline
    publisher: ResultPublisher
    lossless: bool
    created: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    queue: deque = field(default_factory=deque)
    received: int = 0
    dropped: int = 0
    duplicates: int = 0
    busy: int = 0
    errors: Counter = field(default_factory=Counter)
    last_seq: Optional[int] = None  # the newest seq taken from the current publisher session
    refused_from: Optional[int] = None  # lossless: the oldest seq refused as busy, not yet sent again
    refused_at: float = 0.0
    taken: set = field(default_factory=set)  # seqs taken from the current publisher session (the newest SEQ_WINDOW)
    late: int = 0  # frames taken after a newer one of the same publisher (lost on the way, then resent)
    publisher_session: Optional[str] = None
    next_seq: int = 0
    restored_from: Optional[str] = None  # the snapshot the stream continued from

    @property
    def engine(self):
        return self.pipeline.engine

    @property
    def gmap(self):
        return self.pipeline.gmap

    @property
    def processed(self) -> int:
        return self.pipeline.processed

    def status(self) -> dict[str, Any]:
        p50, p99 = self.publisher.latency_percentiles()
        return {
            "stream_id": self.stream_id, "mode": "lossless" if self.lossless else "live",
            "fps": round(self.pipeline.fps(), 3), "received": self.received, "processed": self.processed,
            "dropped": self.dropped, "duplicates": self.duplicates, "busy": self.busy, "late": self.late,
            "errors": sum(self.errors.values()), "errors_by_kind": dict(self.errors), "queue_depth": len(self.queue),
            "map_points": len(self.gmap), "segment": self.engine.segment, "frames_with_K_given": self.pipeline.k_given,
            "latency_ms_p50": round(p50, 3), "latency_ms_p99": round(p99, 3), "sinks": self.pipeline.sink_stats(),
            "slam": self.pipeline.stage.stats() if self.pipeline.stage is not None else {"backend": "none"},
            "snapshots": dict(self.pipeline.snapshots.stats) if self.pipeline.snapshots is not None else None,
            "restored_from": self.restored_from,
        }

    def export(self, directory: Path, root: Path) -> list[str]:
        """Write the trajectory, map and status *now* into ``directory`` (``save_map``; atomic files),
        which must stay inside ``root`` (:func:`~streamrecon.fileio.confine`)."""
        return self.export_later(directory, root)()

    def export_later(self, directory: Path, root: Path) -> Callable[[], list[str]]:
        """:meth:`export` in two halves: the trajectory, map and status are copied now (on the loop
        thread that owns them); the returned function writes them (in any thread)."""
        confine(root, directory)
        stamps, poses = self.pipeline.trajectory.arrays()
        xyz, rgb, conf = self.gmap.points()
        status = json.dumps(self.status(), indent=1) + "\n"

        def write() -> list[str]:
            confine(root, directory)
            directory.mkdir(parents=True, exist_ok=True)
            write_tum(directory / "trajectory.txt", stamps, poses)
            names = ["trajectory.txt", *write_map_files(directory, xyz, rgb, conf, poses), "status.json"]
            atomic_write_text(directory / "status.json", status)
            return [str(directory / n) for n in names]

        return write
