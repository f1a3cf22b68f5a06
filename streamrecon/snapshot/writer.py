"""Periodic snapshots of one stream: when they are due, the capture in the frame loop, the write on a
thread (the frame loop never waits for the disk; a snapshot due while the last one is still being
written is skipped and counted)."""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .store import SnapshotStore


class SnapshotBusy(RuntimeError):
    """The stream cannot be captured consistently right now (its loop closer is still busy)."""

__all__ = ["SnapshotPolicy", "Snapshotter", "SnapshotBusy", "parse_every"]

_logger = logging.getLogger(__name__)


def parse_every(text: Optional[str]) -> tuple[int, float]:
    """``"200"`` -> every 200 frames; ``"30s"`` -> every 30 seconds; ``None``/``"0"`` -> only at the end.

    Raises:
        ValueError: for anything else.
    """
    if text is None:
        return 0, 0.0
    t = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|seconds|frames|f)?", t)
    if not m:
        raise ValueError(f"--snapshot-every must be N (frames) or Ns (seconds), got {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    if unit in ("s", "sec", "seconds"):
        return 0, value
    if value != int(value):
        raise ValueError(f"--snapshot-every {text!r}: a frame count must be a whole number")
    return int(value), 0.0


def _lower_priority(nice: int = 10) -> None:
    """The writer thread yields the CPU to the frame loop (Linux: a thread is a task with its own niceness)."""
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


@dataclass(frozen=True)
class SnapshotPolicy:
    """Args:
        root: the stream's snapshot root (see :class:`~streamrecon.snapshot.store.SnapshotStore`).
        every_frames / every_s: a snapshot after this many frames / seconds since the last (0 = off).
        keep: automatic snapshots kept.
        at_close: a last snapshot when the stream closes.
        boundary: the directory snapshot writes must stay inside (``None``: not checked).
    """

    root: Path
    every_frames: int = 0
    every_s: float = 0.0
    keep: int = 2
    at_close: bool = True
    boundary: Optional[Path] = None

    @classmethod
    def of(cls, root: str | Path, every: Optional[str] = None, keep: int = 2,
           boundary: Optional[str | Path] = None) -> "SnapshotPolicy":
        frames, seconds = parse_every(every)
        return cls(Path(root), frames, seconds, keep, boundary=None if boundary is None else Path(boundary))


class Snapshotter:
    """Args:
        policy: where and when.
        context: ``() -> dict`` of extra manifest entries at capture time (``run``: the source position).
    """

    def __init__(self, policy: SnapshotPolicy, context: Optional[Callable[[], dict]] = None) -> None:
        self.policy = policy
        self.store = SnapshotStore(policy.root, keep=policy.keep, boundary=policy.boundary)
        self.context = context
        self._last_frames = 0
        self._last_time = time.monotonic()
        self._busy = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.stats: dict[str, Any] = {"written": 0, "skipped_busy": 0, "failed": 0, "last": None, "last_frames": None,
                                      "last_bytes": 0, "capture_ms_max": 0.0, "capture_ms_mean": 0.0,
                                      "write_ms_max": 0.0, "last_error": None}
        self._capture_sum = 0.0
        self._captures = 0
        #: ``(name, frames)`` of the latest snapshot written by this writer (``None``: none yet)
        self.latest: Optional[tuple] = None

    def due(self, frames: int) -> bool:
        p = self.policy
        if p.every_frames and frames - self._last_frames >= p.every_frames:
            return True
        return bool(p.every_s) and time.monotonic() - self._last_time >= p.every_s

    def _capture(self, pipeline) -> tuple:
        from .state import capture

        t0 = time.perf_counter()
        tree, tensors, meta = capture(pipeline, self.context() if self.context is not None else None)
        ms = 1e3 * (time.perf_counter() - t0)
        self._captures += 1
        self._capture_sum += ms
        self.stats["capture_ms_max"] = round(max(self.stats["capture_ms_max"], ms), 3)
        self.stats["capture_ms_mean"] = round(self._capture_sum / self._captures, 3)
        self._last_frames, self._last_time = pipeline.processed, time.monotonic()
        return tree, tensors, meta

    def _write(self, tree, tensors, meta, name: Optional[str] = None, raise_errors: bool = False) -> Optional[Path]:
        t0 = time.perf_counter()
        try:
            path = self.store.write(tree, tensors, meta, name=name)
        except Exception as e:  # a full disk must not stop the stream; the previous snapshot stays
            self.stats["failed"] += 1
            self.stats["last_error"] = f"{type(e).__name__}: {e}"
            _logger.error("snapshot failed (the previous one is kept): %s", self.stats["last_error"])
            if raise_errors:
                raise
            return None
        finally:
            self.stats["write_ms_max"] = round(max(self.stats["write_ms_max"], 1e3 * (time.perf_counter() - t0)), 3)
        self.latest = (path.name, meta.get("frames"))  # one assignment: read whole from another thread
        self.stats.update(written=self.stats["written"] + 1, last=path.name, last_frames=meta.get("frames"),
                          last_bytes=sum(f.stat().st_size for f in path.iterdir()))
        return path

    def submit(self, pipeline) -> bool:
        """Capture now, write on the writer thread; ``False`` (counted) when the last write is still going."""
        if not self._busy.acquire(blocking=False):
            self.stats["skipped_busy"] += 1
            self._last_frames, self._last_time = pipeline.processed, time.monotonic()
            return False
        try:
            tree, tensors, meta = self._capture(pipeline)
        except SnapshotBusy:  # the loop closer is still working through its queue: next time
            self._busy.release()
            self.stats["skipped_busy"] += 1
            return False
        except BaseException:
            self._busy.release()
            raise

        def work() -> None:
            try:
                _lower_priority()
                self._write(tree, tensors, meta)
            finally:
                self._busy.release()

        self._thread = threading.Thread(target=work, name="snapshot-writer", daemon=False)
        self._thread.start()
        return True

    def write_now(self, pipeline, name: Optional[str] = None) -> Path:
        """Capture and write in the calling thread (after any write in progress); raises on failure
        (the previous snapshots stay)."""
        with self._busy:
            tree, tensors, meta = self._capture(pipeline)
            return self._write(tree, tensors, meta, name=name, raise_errors=True)

    def close(self) -> None:
        """Wait for a write in progress."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
