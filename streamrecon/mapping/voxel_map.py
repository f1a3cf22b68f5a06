"""GlobalMap: a voxel-downsampled, colour-averaged point map with a hard point budget.

Each integrated point goes to the voxel ``floor(p / voxel_size)``; a voxel keeps the sum of its
points (for the centroid), the sum of their colours (for the mean colour), the point count, the
highest confidence seen and the frame that last touched it. Points below the confidence threshold
or non-finite are dropped first.

Storage: per-voxel aggregates live in append-only arrays (a voxel keeps its row), and a sorted
``(key, row)`` index finds them. A frame's points are grouped with one sort; existing voxels are
found by binary search and updated in place; new voxels are appended and merged into the index in
O(N) (no re-sort), so a frame costs O(k log k + N) memory traffic of 16 bytes per voxel.

Budget: when the map holds more than ``max_points`` voxels, either the voxel size doubles and all
voxels are re-aggregated (``coarsen``, the default: the whole map is kept, less finely), or the
voxels that were updated longest ago are evicted down to 90 % of the budget (``evict``: a sliding
window map). Either way memory is bounded for arbitrarily long runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["MapConfig", "GlobalMap", "IntegrateResult", "DEFAULT_CONF_THRESH", "model_conf_thresh"]

_logger = logging.getLogger(__name__)
_BITS = 21
_OFFSET = 1 << (_BITS - 1)
_MASK = (1 << _BITS) - 1


DEFAULT_CONF_THRESH = 1.5  # the reference demo's value, for the official checkpoints


def model_conf_thresh(model, value: Optional[float] = None) -> float:
    """The confidence threshold to use with ``model``: ``value`` when given, else the threshold its
    checkpoint recommends (metadata ``conf_thresh``; the bundled model calibrates its own), else 1.5."""
    if value is not None:
        return float(value)
    meta = getattr(model, "checkpoint_meta", None) or {}
    try:
        return float(meta.get("conf_thresh", DEFAULT_CONF_THRESH))
    except (TypeError, ValueError):
        return DEFAULT_CONF_THRESH


@dataclass(frozen=True)
class MapConfig:
    """Args:
        voxel_size: initial voxel edge in world units (metres for metric models).
        max_points: hard budget on the number of voxels (points) kept.
        conf_thresh: drop points whose confidence is not above this (CUT3R confidences are > 1).
        budget_policy: ``coarsen`` (double the voxel size) or ``evict`` (drop the oldest voxels).
        pixel_stride: integrate every n-th pixel in each direction (1 = all).
    """

    voxel_size: float = 0.02
    max_points: int = 2_000_000
    conf_thresh: float = 1.5
    budget_policy: str = "coarsen"
    pixel_stride: int = 2

    def __post_init__(self) -> None:
        if self.voxel_size <= 0:
            raise ValueError(f"voxel_size must be > 0, got {self.voxel_size}")
        if self.max_points < 1:
            raise ValueError(f"max_points must be >= 1, got {self.max_points}")
        if self.budget_policy not in ("coarsen", "evict"):
            raise ValueError(f"budget_policy must be 'coarsen' or 'evict', got {self.budget_policy!r}")
        if self.pixel_stride < 1:
            raise ValueError("pixel_stride must be >= 1")


@dataclass
class IntegrateResult:
    """What one integration did: points in, points kept, and the voxels it created
    (centroids ``(K, 3)`` float32, colours ``(K, 3)`` uint8) for incremental display."""

    points_in: int
    points_kept: int
    new_points: np.ndarray
    new_colors: np.ndarray


def _group(keys: np.ndarray, values: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Group rows by key: unique sorted keys, per-group sums (``max`` for names starting with
    ``max_``), and the number of rows per group."""
    order = np.argsort(keys)
    k = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
    out = {}
    for name, v in values.items():
        v = v[order]
        out[name] = (np.maximum if name.startswith("max_") else np.add).reduceat(v, starts, axis=0)
    counts = np.diff(np.append(starts, len(k)))
    return k[starts], out, counts


class _Table:
    """Append-only voxel rows plus a sorted key index."""

    def __init__(self, capacity: int = 1024) -> None:
        self.n = 0
        self.xyz = np.zeros((capacity, 3), np.float64)  # sum of points
        self.rgb = np.zeros((capacity, 3), np.float64)  # sum of colours
        self.count = np.zeros(capacity, np.int64)
        self.conf = np.zeros(capacity, np.float32)  # max confidence
        self.seen = np.zeros(capacity, np.int64)  # last frame that touched the voxel
        self.keys = np.empty(0, np.int64)  # sorted
        self.rows = np.empty(0, np.int64)  # row of keys[i]

    def _grow(self, need: int) -> None:
        cap = len(self.count)
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        for name in ("xyz", "rgb", "count", "conf", "seen"):
            old = getattr(self, name)
            arr = np.zeros((new_cap,) + old.shape[1:], old.dtype)
            arr[: self.n] = old[: self.n]
            setattr(self, name, arr)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key, or -1."""
        pos = np.searchsorted(self.keys, keys)
        pos_c = np.minimum(pos, max(len(self.keys) - 1, 0))
        hit = (pos < len(self.keys)) & (self.keys[pos_c] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        return np.where(hit, self.rows[pos_c] if len(self.keys) else -1, -1)

    def append(self, keys: np.ndarray, xyz, rgb, count, conf, seen) -> np.ndarray:
        """Add new voxels (keys sorted, absent from the table); returns their rows."""
        k = len(keys)
        rows = np.arange(self.n, self.n + k)
        self._grow(self.n + k)
        sl = slice(self.n, self.n + k)
        self.xyz[sl], self.rgb[sl], self.count[sl], self.conf[sl], self.seen[sl] = xyz, rgb, count, conf, seen
        self.n += k
        # merge two sorted, disjoint key lists in O(N + k)
        total = len(self.keys) + k
        pos_new = np.searchsorted(self.keys, keys) + np.arange(k)
        is_new = np.zeros(total, bool)
        is_new[pos_new] = True
        merged_keys, merged_rows = np.empty(total, np.int64), np.empty(total, np.int64)
        merged_keys[pos_new], merged_rows[pos_new] = keys, rows
        merged_keys[~is_new], merged_rows[~is_new] = self.keys, self.rows
        self.keys, self.rows = merged_keys, merged_rows
        return rows

    def live(self) -> tuple:
        """The used rows of every aggregate."""
        n = self.n
        return self.xyz[:n], self.rgb[:n], self.count[:n], self.conf[:n], self.seen[:n]


class GlobalMap:
    """Args:
        config: map settings.
    """

    def __init__(self, config: MapConfig = MapConfig()) -> None:
        self.cfg = config
        self.voxel_size = float(config.voxel_size)
        self._t = _Table()
        self.points_integrated = 0
        self.coarsenings = 0
        self.evicted = 0
        self.out_of_range = 0

    def __len__(self) -> int:
        return self._t.n

    # ----------------------------------------------------------------------------------------

    def _keys(self, pts: np.ndarray, voxel: float) -> tuple[np.ndarray, np.ndarray]:
        ijk = np.floor(pts / voxel).astype(np.int64)
        ok = (np.abs(ijk) < _OFFSET - 1).all(axis=1)
        ijk = ijk + _OFFSET
        keys = (ijk[:, 0] << (2 * _BITS)) | (ijk[:, 1] << _BITS) | ijk[:, 2]
        return keys, ok

    def integrate(self, points: np.ndarray, colors: np.ndarray, conf: np.ndarray, frame_index: int) -> IntegrateResult:
        """Add one frame's world points.

        Args:
            points: ``(H, W, 3)`` or ``(N, 3)`` world points.
            colors: matching uint8 RGB.
            conf: ``(H, W)`` or ``(N,)`` confidences.
            frame_index: processed-frame index (recency for eviction).
        """
        s = self.cfg.pixel_stride
        if points.ndim == 3 and s > 1:
            points, colors, conf = points[::s, ::s], colors[::s, ::s], conf[::s, ::s]
        pts = points.reshape(-1, 3)
        col = colors.reshape(-1, 3)
        cf = conf.reshape(-1)
        if not (len(pts) == len(col) == len(cf)):
            raise ValueError(f"points {pts.shape}, colors {col.shape} and conf {cf.shape} disagree")
        n_in = len(pts)
        keep = (cf > self.cfg.conf_thresh) & np.isfinite(pts).all(axis=1)
        pts, col, cf = pts[keep], col[keep], cf[keep]
        keys, ok = self._keys(pts, self.voxel_size)
        if not ok.all():
            self.out_of_range += int((~ok).sum())
            pts, col, cf, keys = pts[ok], col[ok], cf[ok], keys[ok]
        self.points_integrated += len(pts)
        if len(pts) == 0:
            return IntegrateResult(n_in, 0, np.empty((0, 3), np.float32), np.empty((0, 3), np.uint8))
        ukeys, agg, cnt = _group(keys, {"xyz": pts.astype(np.float64), "rgb": col.astype(np.float64), "max_conf": cf})
        t = self._t
        rows = t.find(ukeys)
        old = rows >= 0
        r = rows[old]
        t.xyz[r] += agg["xyz"][old]
        t.rgb[r] += agg["rgb"][old]
        t.count[r] += cnt[old]
        t.conf[r] = np.maximum(t.conf[r], agg["max_conf"][old])
        t.seen[r] = frame_index
        new = ~old
        if new.any():
            t.append(ukeys[new], agg["xyz"][new], agg["rgb"][new], cnt[new], agg["max_conf"][new], frame_index)
        c_new = cnt[new][:, None]
        new_pts = (agg["xyz"][new] / c_new).astype(np.float32)
        new_col = np.clip(agg["rgb"][new] / c_new, 0, 255).round().astype(np.uint8)
        if len(self) > self.cfg.max_points:
            self._enforce_budget()
        return IntegrateResult(n_in, len(pts), new_pts, new_col)

    def _rebuild(self, keys: np.ndarray, xyz, rgb, count, conf, seen) -> None:
        """Replace the table with the given voxels (any key order)."""
        order = np.argsort(keys, kind="stable")
        t = _Table(capacity=max(1024, len(keys)))
        t.append(keys[order], xyz[order], rgb[order], count[order], conf[order], seen[order])
        self._t = t

    def _enforce_budget(self) -> None:
        xyz, rgb, count, conf, seen = self._t.live()
        if self.cfg.budget_policy == "evict":
            target = max(1, int(self.cfg.max_points * 0.9))
            drop = len(count) - target
            keep = np.sort(np.argsort(seen, kind="stable")[drop:])  # newest voxels survive
            keys, _ = self._keys(xyz[keep] / count[keep, None], self.voxel_size)
            self._rebuild(keys, xyz[keep], rgb[keep], count[keep], conf[keep], seen[keep])
            self.evicted += drop
            _logger.info("map budget: evicted %d oldest voxels", drop)
            return
        while len(count) > self.cfg.max_points:
            self.voxel_size *= 2
            self.coarsenings += 1
            keys, _ = self._keys(xyz / count[:, None], self.voxel_size)
            ukeys, agg, _ = _group(keys, {"xyz": xyz, "rgb": rgb, "count": count, "max_conf": conf, "max_seen": seen})
            xyz, rgb, count, conf, seen = agg["xyz"], agg["rgb"], agg["count"], agg["max_conf"], agg["max_seen"]
            self._rebuild(ukeys, xyz, rgb, count, conf, seen)
            _logger.info("map budget: voxel size doubled to %.4g (%d points)", self.voxel_size, len(count))

    # ----------------------------------------------------------------------------------------

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The map: centroids ``(N, 3)`` float32, mean colours ``(N, 3)`` uint8, max confidence ``(N,)``."""
        xyz, rgb, count, conf, _ = self._t.live()
        c = np.maximum(count, 1)[:, None].astype(np.float64)
        return (xyz / c).astype(np.float32), np.clip(rgb / c, 0, 255).round().astype(np.uint8), conf.copy()

    def nbytes(self) -> int:
        t = self._t
        return sum(a.nbytes for a in (t.xyz, t.rgb, t.count, t.conf, t.seen, t.keys, t.rows))

    def stats(self) -> dict:
        return {"points": len(self), "voxel_size": self.voxel_size, "conf_thresh": self.cfg.conf_thresh,
                "points_integrated": self.points_integrated,
                "coarsenings": self.coarsenings, "evicted": self.evicted, "out_of_range": self.out_of_range,
                "bytes": self.nbytes()}

    def clear(self) -> None:
        """Drop every point (the voxel size returns to its configured value)."""
        self.__init__(self.cfg)
