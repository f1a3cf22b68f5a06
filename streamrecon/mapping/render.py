"""What the global map already knows from a viewpoint: its points splatted into a virtual camera with a
z-buffer (colour, depth, coverage), and where that disagrees with the network's prediction.

Used by every raymap probe (``--probe``, ``query_raymap``): the network infers the unobserved view;
the rendering shows what was actually reconstructed there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MapView", "render_map", "depth_disagreement"]

MAX_SPLAT_PX = 4  # largest splat radius (pixels) of one map point


@dataclass(frozen=True)
class MapView:
    """The map seen from a virtual camera.

    Attributes:
        rgb: ``(H, W, 3)`` uint8 colour of the nearest map point per pixel (0 where none).
        depth: ``(H, W)`` float32 its depth along the camera's z axis (NaN where none).
        mask: ``(H, W)`` bool: a map point covers the pixel.
    """

    rgb: np.ndarray
    depth: np.ndarray
    mask: np.ndarray

    @property
    def coverage(self) -> float:
        """Fraction of the pixels the map covers."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def render_map(xyz: np.ndarray, rgb: np.ndarray, T_wc: np.ndarray, K: np.ndarray, hw: tuple[int, int],
               voxel_size: float = 0.0) -> MapView:
    """Splat map points into a pinhole camera, nearest point wins.

    Args:
        xyz: ``(N, 3)`` world points; rgb: ``(N, 3)`` uint8 colours.
        T_wc: ``(4, 4)`` camera-to-world (OpenCV axes); K: ``(3, 3)`` intrinsics of the ``hw`` image.
        hw: ``(H, W)``.
        voxel_size: the map's voxel edge: each point covers the pixels of its voxel's footprint
            (``f * voxel / z``, up to :data:`MAX_SPLAT_PX`), so a voxel map renders without holes.
    """
    h, w = hw
    out_rgb, depth = np.zeros((h, w, 3), np.uint8), np.full((h, w), np.inf, np.float32)
    if len(xyz):
        R, t = np.asarray(T_wc, np.float64)[:3, :3], np.asarray(T_wc, np.float64)[:3, 3]
        Xc = (np.asarray(xyz, np.float64) - t) @ R  # world -> camera: R^T (X - t)
        z = Xc[:, 2]
        front = z > 1e-6
        Xc, z, col = Xc[front], z[front], np.asarray(rgb)[front]
        u = K[0, 0] * Xc[:, 0] / z + K[0, 2]
        v = K[1, 1] * Xc[:, 1] / z + K[1, 2]
        radius = np.clip(np.round(0.5 * K[0, 0] * voxel_size / z), 0, MAX_SPLAT_PX).astype(np.int64)
        order = np.argsort(-z, kind="stable")  # far first: a nearer point written later wins
        u, v, z, col, radius = u[order], v[order], z[order].astype(np.float32), col[order], radius[order]
        ui, vi = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
        for r in range(int(radius.max(initial=0)) + 1):
            big = radius >= r
            for du in range(-r, r + 1):
                for dv in range(-r, r + 1):
                    if max(abs(du), abs(dv)) != r:
                        continue  # each ring once
                    x, y = ui[big] + du, vi[big] + dv
                    ok = (x >= 0) & (x < w) & (y >= 0) & (y < h)
                    x, y, zz, cc = x[ok], y[ok], z[big][ok], col[big][ok]
                    nearer = zz < depth[y, x]  # the z-buffer across rings
                    x, y, zz, cc = x[nearer], y[nearer], zz[nearer], cc[nearer]
                    # within one assignment the last write wins: points are far-to-near, so the nearest
                    depth[y, x] = zz
                    out_rgb[y, x] = cc
    mask = np.isfinite(depth)
    depth[~mask] = np.nan
    return MapView(rgb=out_rgb, depth=depth, mask=mask)


def depth_disagreement(predicted_depth: np.ndarray, view: MapView) -> np.ndarray:
    """``(H, W)`` float32 ``|d_pred - d_map| / d_map`` where both exist (NaN elsewhere)."""
    out = np.full(view.depth.shape, np.nan, np.float32)
    both = view.mask & np.isfinite(predicted_depth) & (predicted_depth > 0)
    out[both] = np.abs(predicted_depth[both] - view.depth[both]) / view.depth[both]
    return out
