"""GlobalMap: a voxel-downsampled, colour-averaged point map with a hard point budget.

Each integrated point goes to the voxel ``floor(p / voxel_size)`` (computed in float64); a voxel
keeps the sum of its points (for the centroid), the sum of their colours (for the mean colour), the
point count, the highest confidence seen, the frame that last touched it and its key (the packed
integer voxel index). Points at or below the confidence threshold are dropped first; of the rest,
non-finite points are dropped and counted (``non_finite``), and so are points whose voxel index does
not fit the key (``out_of_range``: ``|floor(p / voxel_size)| >= 2**20 - 1`` on some axis). The range
check is done in floating point, before any integer cast, so a huge coordinate (1e30) can never wrap
around into a real voxel.

Storage: per-voxel aggregates live in append-only arrays (a voxel keeps its row), and a sorted
``(key, row)`` index finds them. A frame's points are grouped with one sort; existing voxels are
found by binary search and updated in place; new voxels are appended and merged into the index in
O(N) (no re-sort), so a frame costs O(k log k + N) memory traffic of 16 bytes per voxel.

Budget: when the map holds more than ``max_points`` voxels, either the voxel size doubles and all
voxels are re-aggregated (``coarsen``, the default: the whole map is kept, less finely), or the
voxels that were updated longest ago are evicted down to 90 % of the budget (``evict``: a sliding
window map). Either way memory is bounded for arbitrarily long runs. Keys are never recomputed from
float centroids: eviction keeps the stored keys, and coarsening maps the stored integer index ``ijk``
to ``ijk // 2`` (exactly ``floor(p / (2 * voxel_size))`` for every point of the voxel), so each old
voxel goes to exactly one new voxel and keys stay unique. Voxels straddling the origin cannot merge
below 8 (one per octant); when coarsening can no longer shrink the map, the oldest voxels are evicted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

__all__ = ["MapConfig", "GlobalMap", "IntegrateResult", "DEFAULT_CONF_THRESH"]

_logger = logging.getLogger(__name__)
_BITS = 21
_OFFSET = 1 << (_BITS - 1)
_MASK = (1 << _BITS) - 1


DEFAULT_CONF_THRESH = 1.5  # the reference demo's value, for the official checkpoints


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

    _snapshot_fields = ("n", "xyz", "rgb", "count", "conf", "seen", "key", "keys", "rows")

    def _snapshot_get(self) -> dict:
        """The used rows only (snapshots; a restored table grows again from there)."""
        n = self.n
        return {"n": n, **{a: getattr(self, a)[:n] for a in ("xyz", "rgb", "count", "conf", "seen", "key")},
                "keys": self.keys, "rows": self.rows}

    def __init__(self, capacity: int = 1024) -> None:
        self.n = 0
        self.xyz = np.zeros((capacity, 3), np.float64)  # sum of points
        self.rgb = np.zeros((capacity, 3), np.float64)  # sum of colours
        self.count = np.zeros(capacity, np.int64)
        self.conf = np.zeros(capacity, np.float32)  # max confidence
        self.seen = np.zeros(capacity, np.int64)  # last frame that touched the voxel
        self.key = np.zeros(capacity, np.int64)  # the voxel's key (packed integer voxel index)
        self.keys = np.empty(0, np.int64)  # sorted
        self.rows = np.empty(0, np.int64)  # row of keys[i]

    def _grow(self, need: int) -> None:
        cap = len(self.count)
        if need <= cap:
            return
        new_cap = max(need, 2 * cap)
        for name in ("xyz", "rgb", "count", "conf", "seen", "key"):
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
        self.key[sl] = keys
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
        """The used rows of every aggregate (the key column is ``live_keys()``)."""
        n = self.n
        return self.xyz[:n], self.rgb[:n], self.count[:n], self.conf[:n], self.seen[:n]

    def live_keys(self) -> np.ndarray:
        """The key of every used row (row order, not sorted)."""
        return self.key[: self.n]

    def select(self, keep: np.ndarray) -> "_Table":
        """A new table with only the rows where ``keep`` (bool, one per used row) is set, in row order;
        the sorted index is filtered in O(N), keys are carried over unchanged."""
        n = self.n
        m = int(np.count_nonzero(keep))
        t = _Table(capacity=max(1024, m))
        for name in ("xyz", "rgb", "count", "conf", "seen", "key"):
            getattr(t, name)[:m] = getattr(self, name)[:n][keep]
        t.n = m
        new_row = np.cumsum(keep) - 1
        sel = keep[self.rows]
        t.keys = self.keys[sel]
        t.rows = new_row[self.rows[sel]]
        return t


class GlobalMap:
    """Args:
        config: map settings.
    """

    _snapshot_fields = ("cfg", "voxel_size", "_t", "points_integrated", "coarsenings", "evicted", "out_of_range",
                        "non_finite")

    def __init__(self, config: MapConfig = MapConfig()) -> None:
        self.cfg = config
        self.voxel_size = float(config.voxel_size)
        self._t = _Table()
        self.points_integrated = 0
        self.coarsenings = 0
        self.evicted = 0
        self.out_of_range = 0
        self.non_finite = 0

    def __len__(self) -> int:
        return self._t.n

    # ----------------------------------------------------------------------------------------

    @staticmethod
    def _voxel_index(pts: np.ndarray, voxel: float) -> tuple[np.ndarray, np.ndarray]:
        """``floor(pts / voxel)`` as float64 ``(N, 3)`` and whether each row fits a key. Checked in
        float, before any integer cast: non-finite or huge values are simply not ``< _OFFSET - 1``."""
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.divide(pts, voxel, dtype=np.float64)
        np.floor(v, out=v)
        ok = (np.abs(v) < _OFFSET - 1).all(axis=1)
        return v, ok

    @staticmethod
    def _encode(ijk: np.ndarray) -> np.ndarray:
        """Pack in-range integer voxel indices ``(N, 3)`` into non-negative int64 keys."""
        ijk = ijk.astype(np.int64) + _OFFSET
        return (ijk[:, 0] << (2 * _BITS)) | (ijk[:, 1] << _BITS) | ijk[:, 2]

    @staticmethod
    def _decode(keys: np.ndarray) -> np.ndarray:
        """The integer voxel indices ``(N, 3)`` of keys (inverse of ``_encode``)."""
        keys = np.asarray(keys, np.int64)
        ijk = np.stack([(keys >> (2 * _BITS)) & _MASK, (keys >> _BITS) & _MASK, keys & _MASK], axis=1)
        return ijk - _OFFSET

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
        keep = cf > self.cfg.conf_thresh
        pts, col, cf = pts[keep].astype(np.float64, copy=False), col[keep], cf[keep]
        ijk, ok = self._voxel_index(pts, self.voxel_size)  # non-finite points fail the range check too
        if not ok.all():
            bad = ~ok
            n_bad = int(np.count_nonzero(bad))
            n_nonfinite = int(np.count_nonzero(~np.isfinite(pts[bad]).all(axis=1)))
            self.non_finite += n_nonfinite
            self.out_of_range += n_bad - n_nonfinite
            pts, col, cf, ijk = pts[ok], col[ok], cf[ok], ijk[ok]
        keys = self._encode(ijk)  # only in-range indices are ever cast to int
        self.points_integrated += len(pts)
        if len(pts) == 0:
            return IntegrateResult(n_in, 0, np.empty((0, 3), np.float32), np.empty((0, 3), np.uint8))
        ukeys, agg, cnt = _group(keys, {"xyz": pts, "rgb": col.astype(np.float64), "max_conf": cf})
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
        """Replace the table with the given voxels (unique keys, any order)."""
        order = np.argsort(keys, kind="stable")
        t = _Table(capacity=max(1024, len(keys)))
        t.append(keys[order], xyz[order], rgb[order], count[order], conf[order], seen[order])
        self._t = t

    def _evict_to(self, target: int) -> None:
        """Drop the least recently updated voxels down to ``target``; survivors keep their keys."""
        seen = self._t.live()[4]
        drop = len(seen) - target
        if drop <= 0:
            return
        keep = np.zeros(len(seen), bool)
        keep[np.argsort(seen, kind="stable")[drop:]] = True  # newest voxels survive
        self._t = self._t.select(keep)
        self.evicted += drop
        _logger.info("map budget: evicted %d oldest voxels", drop)

    def _enforce_budget(self) -> None:
        if self.cfg.budget_policy == "evict":
            self._evict_to(max(1, int(self.cfg.max_points * 0.9)))
            return
        xyz, rgb, count, conf, seen = self._t.live()
        keys = self._t.live_keys()
        ijk = self._decode(keys)
        changed = False
        # once every index is -1 or 0 (one voxel per octant) doubling cannot merge anything more
        while len(count) > self.cfg.max_points and (ijk.min() < -1 or ijk.max() > 0):
            self.voxel_size *= 2
            self.coarsenings += 1
            changed = True
            # floor division of the stored integer index: exactly floor(p / (2 * voxel)) for the voxel's points
            keys, agg, _ = _group(self._encode(ijk // 2),
                                  {"xyz": xyz, "rgb": rgb, "count": count, "max_conf": conf, "max_seen": seen})
            xyz, rgb, count, conf, seen = agg["xyz"], agg["rgb"], agg["count"], agg["max_conf"], agg["max_seen"]
            ijk = self._decode(keys)
            _logger.info("map budget: voxel size doubled to %.4g (%d points)", self.voxel_size, len(count))
        if changed:
            self._rebuild(keys, xyz, rgb, count, conf, seen)
        if len(self) > self.cfg.max_points:
            _logger.warning("map budget: %d voxels around the origin cannot be coarsened below %d; evicting",
                            len(self), self.cfg.max_points)
            self._evict_to(self.cfg.max_points)

    # ----------------------------------------------------------------------------------------

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The map: centroids ``(N, 3)`` float32, mean colours ``(N, 3)`` uint8, max confidence ``(N,)``."""
        xyz, rgb, count, conf, _ = self._t.live()
        c = np.maximum(count, 1)[:, None].astype(np.float64)
        return (xyz / c).astype(np.float32), np.clip(rgb / c, 0, 255).round().astype(np.uint8), conf.copy()

    def nbytes(self) -> int:
        t = self._t
        return sum(a.nbytes for a in (t.xyz, t.rgb, t.count, t.conf, t.seen, t.key, t.keys, t.rows))

    def stats(self) -> dict:
        return {"points": len(self), "voxel_size": self.voxel_size, "conf_thresh": self.cfg.conf_thresh,
                "points_integrated": self.points_integrated,
                "coarsenings": self.coarsenings, "evicted": self.evicted, "out_of_range": self.out_of_range,
                "non_finite": self.non_finite, "bytes": self.nbytes()}

    def clear(self) -> None:
        """Drop every point (the voxel size returns to its configured value)."""
        self.__init__(self.cfg)
