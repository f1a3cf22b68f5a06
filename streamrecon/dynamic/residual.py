"""Moving pixels as what the map did not expect (``--dynamic-mask residual``): the frame's depth against
the global map rendered from the frame's pose.

A pixel whose depth is well in front of the surface the map holds there has something new in the
space the map saw through: a moved object. Per frame (after the pose is known, before the frame
enters the map):

1. the map is splatted into the frame's camera (:func:`streamrecon.mapping.render.render_map`);
2. ``r = (d_map - d) / d_map`` where both exist (only in front counts: a surface behind the map's is a
   place the map had wrong or an object that left, not a mover in this frame);
3. ``score = clip(r / (2 tau), 0, 1)`` with ``tau`` = :data:`TAU_REL`; 0 where the map has nothing.

Needs the map to know the place already (nothing is scored on the first view of anything) and depth
and poses good enough that the static scene renders where it is seen: with the bundled model's
prior-like depth this cue is noise (measured: docs/ACCURACY.md); with the official weights and the
SLAM backend it is the geometric counterpart of the attention cue.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["residual_score", "TAU_REL"]

TAU_REL = 0.15  # relative depth residual where the score is 0.5
MAX_MAP_POINTS = 400_000  # the map points rendered per frame (a strided subset beyond this)


def residual_score(map_xyz: np.ndarray, map_rgb: np.ndarray, depth: np.ndarray, T_wc: np.ndarray, K: np.ndarray,
                   voxel_size: float, tau: float = TAU_REL) -> Optional[np.ndarray]:
    """``(H, W)`` float32 score for a frame with depth ``depth`` ``(H, W)``, pose ``T_wc`` and model-pixel
    intrinsics ``K``, against the map ``map_xyz`` ``(M, 3)`` (``None`` when the map is empty)."""
    from ..mapping.render import render_map

    if len(map_xyz) == 0:
        return None
    step = max(1, -(-len(map_xyz) // MAX_MAP_POINTS))
    view = render_map(map_xyz[::step], map_rgb[::step], T_wc, K, depth.shape, voxel_size=voxel_size * step ** 0.5)
    d_map = view.depth
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (d_map - depth) / d_map
    ok = view.mask & np.isfinite(r) & (depth > 0)
    s = np.zeros(depth.shape, np.float32)
    s[ok] = np.clip(r[ok] / (2 * tau), 0.0, 1.0)
    return s
