"""One stream inside the node: its engine (state), map, trajectory, queue and counters."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..engine import FrameResult, StreamEngine
from ..fileio import atomic_write_text
from ..mapping import GlobalMap, write_glb, write_ply, write_tum
from ..wire import FrameMessage

__all__ = ["StreamSession", "Pending"]


@dataclass
class Pending:
    """A received, validated, not yet decoded frame and where its acknowledgement goes."""

    msg: FrameMessage
    recv_ns: int
    reply_to: Optional[list] = None  # ROUTER envelope for a deferred ack (lossless / REQ peers)


@dataclass
class StreamSession:
    """State of one ``stream_id``.

    Attributes:
        lossless: deliver every frame in order (acks when processed) instead of newest-wins.
        queue: frames waiting; live streams keep only the newest one.
    """

    stream_id: str
    engine: StreamEngine
    gmap: GlobalMap
    lossless: bool
    created: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    queue: deque = field(default_factory=deque)
    received: int = 0
    processed: int = 0
    dropped: int = 0
    duplicates: int = 0
    busy: int = 0
    errors: Counter = field(default_factory=Counter)
    last_seq: Optional[int] = None
    publisher_session: Optional[str] = None
    next_seq: int = 0
    stamps: list = field(default_factory=list)
    poses: list = field(default_factory=list)
    _recent: deque = field(default_factory=lambda: deque(maxlen=50))
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=1000))

    def fps(self) -> float:
        r = self._recent
        return (len(r) - 1) / (r[-1] - r[0]) if len(r) > 1 and r[-1] > r[0] else 0.0

    def record(self, result: FrameResult, latency_ms: float) -> None:
        self.processed += 1
        self._recent.append(time.monotonic())
        self.latency_ms.append(latency_ms)
        self.stamps.append(result.stamp)
        self.poses.append(result.T_wc.astype(np.float64))

    def status(self) -> dict[str, Any]:
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
        return {
            "stream_id": self.stream_id, "mode": "lossless" if self.lossless else "live", "fps": round(self.fps(), 3),
            "received": self.received, "processed": self.processed, "dropped": self.dropped,
            "duplicates": self.duplicates, "busy": self.busy, "errors": sum(self.errors.values()),
            "errors_by_kind": dict(self.errors), "queue_depth": len(self.queue), "map_points": len(self.gmap),
            "segment": self.engine.segment, "latency_ms_p50": round(float(np.percentile(lat, 50)), 3),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 3),
        }

    def save(self, directory: Path) -> list[str]:
        """Write trajectory.txt, map.ply, map.glb and status.json (atomically) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        poses = np.stack(self.poses) if self.poses else np.empty((0, 4, 4))
        write_tum(directory / "trajectory.txt", self.stamps, poses)
        xyz, rgb, conf = self.gmap.points()
        write_ply(directory / "map.ply", xyz, rgb, conf)
        write_glb(directory / "map.glb", xyz, rgb, path_xyz=poses[:, :3, 3] if len(poses) else None)
        import json

        atomic_write_text(directory / "status.json", json.dumps(self.status(), indent=1) + "\n")
        return [str(directory / n) for n in ("trajectory.txt", "map.ply", "map.glb", "status.json")]
