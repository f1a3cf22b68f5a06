"""The network on a worker thread (``--network-every``): the frame loop hands it selected frames and
takes their results when they are ready, so tracking gives a pose for every frame meanwhile.

The engine (and so the recurrent state) is only touched by the worker, one frame at a time, in the
order the frames were submitted. At most one frame runs and ``depth`` more wait: a lossless source
(files) waits for room (:meth:`submit` with ``block=True``), a live one never does -- a frame that
finds the queue full is not given to the network (counted in ``skipped_busy``), so no backlog builds.
With ``inline=True`` (``--deterministic``, tests) the frame is processed in the calling thread and
its result is handed out at the next :meth:`poll`: the same frames always give the same results.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Optional

from ..frames import Frame, FrameResult

__all__ = ["NetworkWorker", "NetworkDone"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkDone:
    """One network result: the frame's pipeline ``index``, the result (or the exception the step
    raised), the model's wall time and how long the frame waited before it (ms)."""

    index: int
    result: Optional[FrameResult]
    error: Optional[BaseException]
    ms: float
    wait_ms: float


class NetworkWorker:
    """Args:
        engine: the stream's engine (this worker becomes its only user).
        depth: frames that may wait while one runs (>= 1).
        inline: process in the caller's thread (deterministic).
    """

    def __init__(self, engine, depth: int = 1, inline: bool = False, name: str = "streamrecon-network") -> None:
        self.engine, self.inline = engine, inline
        self._in: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._out: list[NetworkDone] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = 0  # frames submitted and not yet finished
        self.submitted = self.done = self.failed = self.skipped_busy = 0
        self.dropped_at_close = 0  # frames still waiting when close() ran out of time
        self.busy_s = 0.0  # time the network computed
        self.started = time.monotonic()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        if not inline:
            self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------

    def _run(self, index: int, frame: Frame, t_submit: float) -> NetworkDone:
        t0 = time.perf_counter()
        try:
            res, err = self.engine.process(frame), None
        except Exception as e:  # reported by the pipeline with the frame's index
            res, err = None, e
        t1 = time.perf_counter()
        return NetworkDone(index, res, err, 1e3 * (t1 - t0), 1e3 * (t0 - t_submit))

    def _finish(self, d: NetworkDone) -> None:
        with self._lock:
            self._out.append(d)
            self._running -= 1
            self.busy_s += d.ms / 1e3
            self.done += d.error is None
            self.failed += d.error is not None
            self._idle.notify_all()

    def _loop(self) -> None:
        while True:
            item = self._in.get()
            if item is None:
                return
            self._finish(self._run(*item))

    # ------------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Frames submitted whose result has not been finished yet."""
        with self._lock:
            return self._running

    @property
    def full(self) -> bool:
        """Whether a frame submitted now would have to wait for room (one runs, ``depth`` wait)."""
        return not self.inline and self._in.full()

    def submit(self, index: int, frame: Frame, block: bool) -> bool:
        """Hand a frame to the network. Returns ``False`` (and counts it) when the queue is full and
        ``block`` is false; with ``block`` it waits for room."""
        if self._closed:
            raise RuntimeError("the network worker is closed")
        with self._lock:
            self._running += 1
        if self.inline:
            self.submitted += 1
            self._finish(self._run(index, frame, time.perf_counter()))
            return True
        try:
            self._in.put((index, frame, time.perf_counter()), block=block)
        except queue.Full:
            with self._lock:
                self._running -= 1
            self.skipped_busy += 1
            return False
        self.submitted += 1
        return True

    def poll(self) -> list[NetworkDone]:
        """The results finished since the last call, in submission order."""
        with self._lock:
            out, self._out = self._out, []
        return out

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait until every submitted frame is finished; ``False`` on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._running:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 60.0) -> None:
        """Finish what was submitted (at most ``timeout`` s) and stop the thread."""
        if self._closed:
            return
        finished = self.wait(timeout)
        self._closed = True
        if self._thread is None:
            return
        if not finished:  # frames still waiting are not started: dropped and counted (the time is up)
            while True:
                try:
                    item = self._in.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    with self._lock:
                        self._running -= 1
                        self.dropped_at_close += 1
            _logger.warning("network worker: time is up at close; %d waiting frame(s) dropped%s", self.dropped_at_close,
                            ", a step still running" if self._running else "")
        try:
            self._in.put(None, timeout=0.1 if not finished else max(timeout, 0.1))
        except queue.Full:  # cannot happen after the drain; the daemon thread is left to its step
            return
        self._thread.join(timeout if finished else 0.1)

    def stats(self, frames: int, wall_s: float) -> dict:
        """For the summary and the heartbeat: network frames, rate, utilisation, skipped frames."""
        with self._lock:
            done, failed, busy = self.done, self.failed, self.busy_s
        return {"frames": done, "failed": failed, "submitted": self.submitted, "skipped_busy": self.skipped_busy,
                "dropped_at_close": self.dropped_at_close,
                "fraction_of_frames": round(done / frames, 4) if frames else 0.0,
                "network_fps": round(done / wall_s, 3) if wall_s > 0 else 0.0,
                "busy_fraction": round(busy / wall_s, 4) if wall_s > 0 else 0.0,
                "mean_ms": round(1e3 * busy / done, 2) if done else 0.0}
