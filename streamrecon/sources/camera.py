"""Live camera source: a grabber thread keeps only the newest frame (no backlog, drops counted).

Works with a webcam index (``0``), a device path (``/dev/video0``), a stream URL, or a video file
replayed in real time (``realtime=True``) to simulate a camera.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Iterator, Optional

from ..frames import Frame
from .base import FrameSource, SourceError

__all__ = ["CameraSource"]

_logger = logging.getLogger(__name__)


def _open_capture(device: int | str):
    import cv2

    cap = cv2.VideoCapture(device)
    if cap.isOpened():
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # honoured by some backends (V4L2); the thread does the rest
    return cap


class CameraSource(FrameSource):
    """Newest-frame-wins capture. The device is opened at once (a missing camera is an error here);
    frames are grabbed from the first call of :meth:`frames` on.

    Args:
        device: camera index, device path or URL (anything ``cv2.VideoCapture`` opens).
        name: stream name (default ``cam:<device>``).
        realtime: pace reads at the capture's own frame rate (for files replayed as a camera).
        max_failures: consecutive failed reads (about 10 ms apart) before the camera counts as gone.
        open_capture: factory returning a ``cv2.VideoCapture``-like object (tests inject fakes).
    """

    live = True

    def __init__(self, device: int | str, name: Optional[str] = None, realtime: bool = False, max_failures: int = 200,
                 open_capture: Callable = _open_capture) -> None:
        super().__init__()
        self.device = device
        self.name = name or f"cam:{device}"
        self._cap = open_capture(device)
        if self._cap is None or not self._cap.isOpened():
            raise SourceError(f"cannot open camera {device!r} (no such device, busy, or no permission)")
        fps = float(self._cap.get(5) or 0.0)  # cv2.CAP_PROP_FPS
        self._period = 1.0 / fps if realtime and fps > 0 else 0.0
        self._max_failures = max_failures
        self._cond = threading.Condition()
        self._latest: Optional[Frame] = None
        self._ended = False
        self._stop = threading.Event()
        # grabbing starts with the first frame asked for: frames (and a replay's clock) wait until the
        # node is ready, not while the model loads
        self._thread = threading.Thread(target=self._grab_loop, name=f"grab-{self.name}", daemon=True)
        self._start_lock = threading.RLock()  # a signal handler closing us may interrupt _start()

    def _start(self) -> None:
        with self._start_lock:
            if not self._thread.is_alive() and not self._stop.is_set() and self._thread.ident is None:
                self._thread.start()

    def _grab_loop(self) -> None:
        import cv2

        seq, failures, next_t = 0, 0, time.monotonic()
        try:
            while not self._stop.is_set():
                ok, bgr = self._cap.read()
                stamp = time.time()
                if not ok or bgr is None:
                    failures += 1
                    if failures >= self._max_failures:
                        _logger.warning("%s: no frames after %d tries; stopping", self.name, failures)
                        break
                    time.sleep(0.01)
                    continue
                failures = 0
                try:
                    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) if bgr.ndim == 3 else cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
                except cv2.error as e:
                    self.stats.error(f"frame {seq}: {e}")
                    seq += 1
                    continue
                self.stats.add(read=1)
                with self._cond:
                    if self._latest is not None:
                        self.stats.add(dropped=1)  # the consumer never saw it
                    self._latest = Frame(image=rgb, seq=seq, stamp=stamp, source=self.name)
                    self._cond.notify_all()
                seq += 1
                if self._period:
                    next_t += self._period
                    time.sleep(max(0.0, next_t - time.monotonic()))
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def frames(self) -> Iterator[Frame]:
        self._start()
        while True:
            with self._cond:
                while self._latest is None and not self._ended:
                    self._cond.wait(timeout=0.5)
                if self._latest is None:
                    return
                frame, self._latest = self._latest, None
            yield frame

    def close(self) -> None:
        with self._start_lock:
            self._stop.set()
            if self._thread.ident is None:  # never started: nothing will end the wait in frames()
                with self._cond:
                    self._ended = True
                    self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2.0)
        try:
            self._cap.release()
        except Exception:  # releasing a vanished device must not mask the real shutdown
            pass
