"""The network's depth carried to frames it did not see (``--network-every``).

The tracker needs the network's depth at new corners (keyframes) and to keep its depth scale. A
frame the network skipped has no depth of its own, so the latest network frame's depth is moved
there: its pixels are unprojected (network units), placed with that frame's tracked pose, seen from
the current pose and z-buffered into the model's pixel grid at half resolution (2x2 cells, fewer
holes); cells nothing lands in are NaN ("no prior here"). The result is in the network's units, as
the network's own depth would be.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

__all__ = ["DepthPrior"]

_CELL = 2  # z-buffer cell (model pixels)


@dataclass
class DepthPrior:
    """Args:
        depth: ``(H, W)`` the network frame's depth (network units, unscaled), model pixels.
        K_model: ``(3, 3)`` the intrinsics it was unprojected with, model pixels.
        T_wc: ``(4, 4)`` its tracked camera-to-world (tracker world).
        scale: world units per network unit when it was made (the tracker's depth scale).
        index: the network frame's pipeline index.
    """

    depth: np.ndarray
    K_model: np.ndarray
    T_wc: np.ndarray
    scale: float
    index: int
    _points: Optional[np.ndarray] = field(default=None, repr=False)

    def points(self) -> np.ndarray:
        """``(N, 3)`` the valid pixels' points in the network camera, network units."""
        if self._points is None:
            h, w = self.depth.shape
            v, u = np.mgrid[0:h, 0:w]
            d = self.depth.reshape(-1).astype(np.float64)
            ok = np.isfinite(d) & (d > 0)
            rays = np.c_[u.reshape(-1)[ok], v.reshape(-1)[ok], np.ones(int(ok.sum()))] @ np.linalg.inv(self.K_model).T
            self._points = rays * d[ok, None]
        return self._points

    def correct(self, fn) -> None:
        """Move the prior's pose (and scale) with a loop-closure correction: ``fn(T_wc) -> (T_wc, s)``."""
        self.T_wc, s = fn(self.T_wc)
        self.scale *= s

    def render(self, T_wc: np.ndarray, scale: float, K_model: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """``(H, W)`` depth (network units) at the camera ``T_wc`` (``scale``: the tracker's current
        world units per network unit), on a model grid ``hw`` with intrinsics ``K_model``; NaN where
        no point lands."""
        h, w = hw
        P = self.points() * self.scale  # network camera, world units
        rel = np.linalg.inv(T_wc) @ self.T_wc  # network camera -> this camera
        X = (P @ rel[:3, :3].T + rel[:3, 3]) / max(scale, 1e-12)
        out = np.full(((h + _CELL - 1) // _CELL, (w + _CELL - 1) // _CELL), np.inf)
        z = X[:, 2]
        front = z > 1e-6
        X, z = X[front], z[front]
        uv = (X @ K_model.T)[:, :2] / z[:, None]
        u, v = np.floor(uv[:, 0] + 0.5).astype(np.int64), np.floor(uv[:, 1] + 0.5).astype(np.int64)
        inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
        u, v, z = u[inside] // _CELL, v[inside] // _CELL, z[inside]
        np.minimum.at(out, (v, u), z)
        out[~np.isfinite(out)] = np.nan
        return np.repeat(np.repeat(out, _CELL, 0), _CELL, 1)[:h, :w].astype(np.float32)
