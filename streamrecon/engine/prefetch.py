"""Overlap reading + preprocessing of the next frames with the model on the current one.

A background thread pulls frames from a lossless source and runs :meth:`StreamEngine.prepare` on them
(decoding, resizing and normalising release the GIL), keeping up to ``depth`` prepared frames ready.
Errors of a single frame travel with it and surface when it is consumed, in order.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Optional

from ..frames import Frame

__all__ = ["Prefetcher"]

_END = object()


class Prefetcher:
    """Args:
        frames: an iterator of :class:`Frame` (a lossless source).
        prepare: ``Frame -> prepared`` (normally ``engine.prepare``).
        depth: prepared frames kept ready.

    Iterating yields ``(frame, prepared_or_exception)``.
    """

    def __init__(self, frames, prepare, depth: int = 2) -> None:
        self._frames, self._prepare = frames, prepare
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for frame in self._frames:
                try:
                    item = (frame, self._prepare(frame))
                except Exception as e:  # one bad frame: hand it over, keep going
                    item = (frame, e)
                if not self._put(item):
                    return
        except BaseException as e:  # the source itself failed
            self._error = e
        finally:
            self._put(_END)

    def __iter__(self) -> Iterator[tuple[Frame, object]]:
        while True:
            item = self._q.get()
            if item is _END:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
