"""The trajectory of one stream in chunked arrays: O(1) append, no per-frame Python objects kept."""

from __future__ import annotations

import numpy as np

__all__ = ["Trajectory"]


class Trajectory:
    """Stamps ``(N,)`` float64 and camera-to-world poses ``T_wc`` ``(N, 4, 4)`` float64, global frame.

    Poses go into fixed-size chunks (``chunk`` poses each); reading concatenates them once and caches
    the result until the next append.
    """

    _snapshot_fields = ("_chunk", "_full_T", "_full_t", "_T", "_t", "_n")

    def _snapshot_get(self) -> dict:
        """The open chunk's used rows only (its other rows are uninitialised memory)."""
        return {"_chunk": self._chunk, "_full_T": self._full_T, "_full_t": self._full_t, "_T": self._T[: self._n],
                "_t": self._t[: self._n], "_n": self._n}

    def _after_restore(self) -> None:
        T, t = np.empty((self._chunk, 4, 4)), np.empty(self._chunk)
        T[: self._n], t[: self._n] = self._T[: self._n], self._t[: self._n]
        self._T, self._t, self._cache = T, t, None

    def __init__(self, chunk: int = 1024) -> None:
        self._chunk = chunk
        self._full_T: list[np.ndarray] = []
        self._full_t: list[np.ndarray] = []
        self._T = np.empty((chunk, 4, 4))
        self._t = np.empty(chunk)
        self._n = 0  # used rows of the open chunk
        self._cache: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._full_T) * self._chunk + self._n

    def append(self, stamp: float, T_wc: np.ndarray) -> None:
        self._T[self._n] = T_wc
        self._t[self._n] = stamp
        self._n += 1
        self._cache = None
        if self._n == self._chunk:
            self._full_T.append(self._T)
            self._full_t.append(self._t)
            self._T, self._t, self._n = np.empty((self._chunk, 4, 4)), np.empty(self._chunk), 0

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(stamps (N,), T_wc (N, 4, 4))`` (read-only views; do not modify)."""
        if self._cache is None:
            stamps = np.concatenate([*self._full_t, self._t[: self._n]])
            poses = np.concatenate([*self._full_T, self._T[: self._n]])
            stamps.flags.writeable = poses.flags.writeable = False
            self._cache = (stamps, poses)
        return self._cache

    def last(self) -> np.ndarray | None:
        if self._n:
            return self._T[self._n - 1].copy()
        return self._full_T[-1][-1].copy() if self._full_T else None
