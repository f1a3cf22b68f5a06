"""Monocular feature tracking with the network's depth as the prior (OpenCV only, per frame).

Per frame (grey image at tracking resolution, intrinsics ``K`` in the same pixels, the network's
depth sampled at any pixel):

1. **Tracks**: Shi-Tomasi corners of the current keyframe followed frame to frame with pyramidal
   Lucas-Kanade flow and a forward-backward check (tracks that do not come back within
   ``fb_px`` are dropped). Chosen over ORB matching by measurement: on SUN3D 640x480 it is 3-4x
   cheaper per frame and keeps sub-pixel accuracy on small handheld motions.
2. **Pose**: robust PnP (RANSAC + LM refinement) against the tracks' 3D points when at least
   ``min_pnp`` of them come from triangulation; otherwise the essential matrix between the
   keyframe and the frame (5-point RANSAC) with the translation's length taken from the points'
   prior depths (the network's metric scale); with almost no parallax, PnP against the prior points.
3. **Keyframes**: a new keyframe when the median parallax to the last one exceeds
   ``kf_parallax`` of the image width, too few tracks survive, or tracking is weak. At a keyframe the
   tracks are triangulated between the two keyframes (kept when the ray angle is at least
   ``min_angle_deg``, in front of both cameras and within ``max_reproj_px``), new corners fill the
   image, and their 3D points start from the network depth, scaled to the map.
4. **Depth scale**: the ratio (median) between the triangulated points' depths in this camera and
   the network's depth at the same pixels: the network's depth is multiplied by it before it enters
   the map.
5. **State**: ``ok`` / ``weak`` by inlier count, ``lost`` below ``lost_inliers`` (or no features: a
   black frame, a textureless wall): the caller's fallback pose is used and tracking restarts from
   this frame as a new keyframe; ``init`` for the first frame.
6. **Local bundle adjustment** (``local_ba``, needs gtsam; without it tracking runs as before):
   every track has a persistent integer id; each keyframe records its pose and its observations
   (track id -> pixel) in a window of the last ``ba_window`` keyframes, and the tracks' 3D points
   (triangulated, and with ``ba_prior_points`` the network-prior ones too) are kept per track id
   while a window keyframe sees them. After each new keyframe the window goes to a background
   thread (:class:`~streamrecon.slam.local_ba.BAWorker`, a queue of one: a newer window replaces a
   pending one) that runs :func:`~streamrecon.slam.local_ba.local_bundle_adjust` (gtsam, the oldest
   ``ba_fixed`` keyframes fixed: gauge and scale); it computes only while ``track`` is not running
   (gtsam holds the GIL). ``track`` never waits for a result: at the start of the next call after
   one has arrived it takes the window's optimised keyframe poses and points (outliers beyond
   ``ba_outlier_px`` dropped; a prior point whose rays now span ``min_angle_deg`` counts as
   triangulated), and moves everything the optimisation did not see (the current keyframe and
   the last frame pose, newer keyframes, the other points) by the correction of the newest
   optimised keyframe ``T_opt @ inv(T_old)``, so tracking continues from a consistent state.
   Poses already returned are not revised (``keyframes`` holds the revised keyframe poses). The
   keyframe triangulation leaves the adjusted points alone (``ba_keep_points``), and keyframes come
   at ``ba_kf_parallax`` (more views for the window). Statistics in ``ba_stats``; ``ba_sync``
   runs the adjustment in the calling thread instead (deterministic, for tests).

Poses are ``T_wc`` (camera-to-world, OpenCV axes), in the world of the first frame.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import numpy as np

from ..frames import TrackingInfo

__all__ = ["TrackerConfig", "TrackResult", "Tracker", "KeyframeRecord"]


@dataclass(frozen=True)
class TrackerConfig:
    max_features: int = 400
    min_distance: int = 10
    quality: float = 0.005
    win: int = 17  # measured: 21 -> 17 halves the LK cost (OpenCV's SIMD path) for the same or better ATE
    win_retry: Optional[int] = 21  # a weak or lost frame is tracked again with this window (low texture); None: never
    levels: int = 3
    fb_px: float = 1.0
    kf_parallax: float = 0.05
    kf_min_tracked: float = 0.55
    min_angle_deg: float = 1.0
    max_reproj_px: float = 2.0
    pnp_reproj_px: float = 2.0
    min_pnp: int = 25
    ok_inliers: int = 50
    lost_inliers: int = 12
    min_parallax_px: float = 1.5
    max_keyframes: int = 64
    init_points: int = 50
    init_parallax: float = 0.02
    # local bundle adjustment (see the module docstring)
    local_ba: bool = True
    ba_window: int = 8
    ba_iterations: int = 5  # measured: 10 costs 2x (gtsam ~19 ms per iteration, GIL held) for no better ATE (windows overlap)
    ba_sync: bool = False
    ba_process: bool = False  # the optimisation in a child process instead of the thread (see local_ba)
    ba_nice: int = 0  # the child's niceness (measured: 10 starves it on a loaded 2-core machine)
    ba_fixed: int = 2  # the oldest keyframes of the window held fixed (2: gauge and scale)
    ba_sigma_px: float = 1.0
    ba_huber: float = 1.345  # Huber threshold, in sigmas
    ba_outlier_px: float = 3.0  # points with a larger RMS reprojection error after BA are dropped
    ba_keep_points: bool = True  # keyframe triangulation leaves the bundle-adjusted points as they are
    ba_prior_points: bool = True  # also adjust the tracks' network-prior points (not triangulated)
    ba_kf_parallax: Optional[float] = 0.03  # kf_parallax while the local BA runs (None: the same)


@dataclass(frozen=True)
class TrackResult(TrackingInfo):
    """What :meth:`Tracker.track` found: the :class:`~streamrecon.frames.TrackingInfo` fields (state,
    method, tracked, inliers, keyframe, depth_scale, ms) plus ``T_wc`` ``(4, 4)``, the frame's pose
    (the fallback's when ``state == "lost"``)."""

    T_wc: np.ndarray


@dataclass(frozen=True)
class KeyframeRecord:
    """A keyframe as kept in the bounded database: frame index, pose, depth scale, its corners."""

    index: int
    T_wc: np.ndarray
    depth_scale: float
    keypoints: np.ndarray  # (N, 2) float32, tracking pixels
    track_ids: Optional[np.ndarray] = None  # (N,) int64, the tracks' persistent ids


def _inv(T: np.ndarray) -> np.ndarray:
    R, t = T[:3, :3], T[:3, 3]
    out = np.eye(4)
    out[:3, :3] = R.T
    out[:3, 3] = -R.T @ t
    return out


def _to_cam(T_wc: np.ndarray, X: np.ndarray) -> np.ndarray:
    """World points ``(N, 3)`` -> camera coordinates of the camera ``T_wc``."""
    return (X - T_wc[:3, 3]) @ T_wc[:3, :3]


def _from_rt(rvec: np.ndarray, tvec: np.ndarray) -> np.ndarray:
    """OpenCV world-to-camera ``(rvec, tvec)`` -> ``T_wc``."""
    import cv2

    T_cw = np.eye(4)
    T_cw[:3, :3] = cv2.Rodrigues(rvec)[0]
    T_cw[:3, 3] = tvec.reshape(3)
    return _inv(T_cw)


def _rt(T_wc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    T_cw = _inv(T_wc)
    return cv2.Rodrigues(T_cw[:3, :3])[0], T_cw[:3, 3].reshape(3, 1).copy()


class Tracker:
    """One stream's tracker (not thread-safe; the pipeline calls it in frame order)."""

    def __init__(self, config: TrackerConfig = TrackerConfig()) -> None:
        self.cfg = config
        self.keyframes: deque[KeyframeRecord] = deque(maxlen=config.max_keyframes)
        self.n_keyframes = 0
        self._prev: Optional[np.ndarray] = None  # previous grey image
        self._exclude: Optional[np.ndarray] = None  # this frame's moving pixels (set by track())
        self.dynamic_dropped = 0  # tracks dropped because they landed on a moving object
        self.retries = 0  # weak frames tracked again with the larger window (win_retry)
        self._reset_tracks()
        self.T_prev: Optional[np.ndarray] = None
        self.kf_T: Optional[np.ndarray] = None
        self.kf_index = -1
        self.scale: Optional[float] = None
        self.index = -1
        self.prior_first = False  # measured: PnP on the network's prior before triangulation is worse than E
        # local bundle adjustment: the window of keyframes (index, T_wc, track ids, pixels), the
        # triangulated points by track id, the worker, and an epoch that a tracking restart bumps
        self._next_tid = 0
        self._win: deque[dict] = deque(maxlen=max(2, config.ba_window))
        self._pt_ids = np.zeros(0, np.int64)  # the window's points by track id (sorted)
        self._pt_X = np.zeros((0, 3))
        self._epoch = 0
        self._ba_worker = None
        self._idle = threading.Event()  # set while neither track() nor a busy() frame loop runs
        self._idle.set()
        self._busy_depth = 0
        self.ba_available = False
        if config.local_ba:
            try:  # here, not in the worker's first run: an import holds the GIL for ~0.1 s
                import gtsam  # noqa: F401

                self.ba_available = True
            except ImportError:
                import logging

                logging.getLogger(__name__).warning("local_ba: gtsam is not installed; tracking without it")
        self._ba_ready: Optional[object] = None  # a synchronous run's result, applied at the next call
        self._ba_sum_ms = self._ba_sum_it = 0.0
        self._ba_sum_lat = 0.0
        # runs: windows sent; applied: results taken; failed: degenerate / gtsam errors; stale: from
        # before a restart; replaced: windows superseded before they started; mean/max_ms: compute
        # time; mean_latency_ms: request to result (with the waits for idle); last_error: (initial, final)
        self.ba_stats: dict = {"runs": 0, "applied": 0, "failed": 0, "stale": 0, "replaced": 0,
                               "mean_ms": 0.0, "max_ms": 0.0, "mean_latency_ms": 0.0, "mean_iterations": 0.0,
                               "outliers_dropped": 0, "last_error": None}

    def _reset_tracks(self) -> None:
        self.cur = np.zeros((0, 2), np.float32)  # pixel in the previous / current frame
        self.kf_px = np.zeros((0, 2), np.float32)  # pixel in the keyframe
        self.X = np.zeros((0, 3))  # world point (NaN: unknown)
        self.geo = np.zeros(0, bool)  # X from triangulation (else from the network prior)
        self.tid = np.zeros(0, np.int64)  # persistent track ids
        self.refined = np.zeros(0, bool)  # X from the bundle adjustment: kept at the next keyframe
        self.n_kf_tracks = 0

    # ------------------------------------------------------------------------------------------

    def _detect(self, grey: np.ndarray, existing: np.ndarray, n: int) -> np.ndarray:
        import cv2

        if n <= 0:
            return np.zeros((0, 2), np.float32)
        mask = np.full(grey.shape, 255, np.uint8)
        if self._exclude is not None:  # no new corners on moving objects
            mask[self._exclude] = 0
        for x, y in existing.astype(int):
            cv2.circle(mask, (int(x), int(y)), self.cfg.min_distance, 0, -1)
        pts = cv2.goodFeaturesToTrack(grey, maxCorners=n, qualityLevel=self.cfg.quality,
                                      minDistance=self.cfg.min_distance, mask=mask, blockSize=5)
        return np.zeros((0, 2), np.float32) if pts is None else pts.reshape(-1, 2).astype(np.float32)

    def _flow(self, a: np.ndarray, b: np.ndarray, pts: np.ndarray, win: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        if len(pts) == 0:
            return pts, np.zeros(0, bool)
        win = win or self.cfg.win
        lk = dict(winSize=(win, win), maxLevel=self.cfg.levels,
                  criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
        p1, st1, _ = cv2.calcOpticalFlowPyrLK(a, b, pts.reshape(-1, 1, 2), None, **lk)
        p0, st0, _ = cv2.calcOpticalFlowPyrLK(b, a, p1, None, **lk)
        p1, p0 = p1.reshape(-1, 2), p0.reshape(-1, 2)
        h, w = a.shape
        ok = (st1.reshape(-1) == 1) & (st0.reshape(-1) == 1) & (np.linalg.norm(p0 - pts, axis=1) < self.cfg.fb_px)
        ok &= (p1[:, 0] >= 0) & (p1[:, 0] < w) & (p1[:, 1] >= 0) & (p1[:, 1] < h)
        return p1, ok

    def _new_keyframe(self, grey: np.ndarray, T_wc: np.ndarray, K: np.ndarray,
                      depth_at: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        """Make this frame the keyframe: keep the surviving tracks, add corners with prior 3D points."""
        new = self._detect(grey, self.cur, self.cfg.max_features - len(self.cur))
        if len(new):
            z = depth_at(new, T_wc) * (self.scale or 1.0)
            valid = np.isfinite(z) & (z > 0)
            if valid.mean() < 0.5:  # the network gives no usable depth here: a constant prior
                z = np.full(len(new), self._fallback_depth(T_wc))
            rays = np.c_[new, np.ones(len(new))] @ np.linalg.inv(K).T
            Xc = rays * z[:, None]
            Xw = Xc @ T_wc[:3, :3].T + T_wc[:3, 3]
            Xw[~(np.isfinite(z) & (z > 0))] = np.nan
            self.cur = np.vstack([self.cur, new])
            self.X = np.vstack([self.X, Xw])
            self.geo = np.concatenate([self.geo, np.zeros(len(new), bool)])
            self.tid = np.concatenate([self.tid, np.arange(self._next_tid, self._next_tid + len(new))])
            self.refined = np.concatenate([self.refined, np.zeros(len(new), bool)])
            self._next_tid += len(new)
        self.kf_px = self.cur.copy()
        self.kf_T = T_wc.copy()
        self.kf_index = self.index
        self.n_kf_tracks = len(self.cur)
        self.n_keyframes += 1
        self.keyframes.append(KeyframeRecord(self.index, T_wc.copy(), float(self.scale or 1.0), self.cur.copy(),
                                             self.tid.copy()))
        if self.cfg.local_ba and self.ba_available:
            self._ba_keyframe(K)

    # ------------------------------------------------------------------------------------------ local BA

    def _ba_store(self, ids: np.ndarray, X: np.ndarray) -> None:
        """Set the points ``ids`` in the per-track-id store (``_pt_ids`` sorted, ``_pt_X``)."""
        ok = np.isfinite(X).all(1)
        ids, X = ids[ok], X[ok]
        keep = ~np.isin(self._pt_ids, ids)
        allids = np.concatenate([self._pt_ids[keep], ids])
        allX = np.vstack([self._pt_X[keep], X])
        order = np.argsort(allids, kind="stable")
        self._pt_ids, self._pt_X = allids[order], allX[order]

    def _ba_keyframe(self, K: np.ndarray) -> None:
        """Record the new keyframe in the window, keep its points, and ask for a bundle adjustment."""
        self._win.append({"index": self.index, "T_wc": self.kf_T.copy(), "ids": self.tid.copy(),
                          "px": self.cur.astype(np.float64)})
        use = self.geo | self.cfg.ba_prior_points
        self._ba_store(self.tid[use], self.X[use])
        # memory: only points some window keyframe sees
        seen = np.concatenate([kf["ids"] for kf in self._win])
        keep = np.isin(self._pt_ids, seen)
        self._pt_ids, self._pt_X = self._pt_ids[keep], self._pt_X[keep]
        if len(self._win) <= self.cfg.ba_fixed or len(self._pt_ids) < 12:
            return
        args = (K.copy(), [kf["T_wc"].copy() for kf in self._win], [(kf["ids"], kf["px"]) for kf in self._win],
                self._pt_ids.copy(), self._pt_X.copy())
        kw = dict(kf_ids=[kf["index"] for kf in self._win], n_fixed=self.cfg.ba_fixed,
                  sigma_px=self.cfg.ba_sigma_px, huber_k=self.cfg.ba_huber, iterations=self.cfg.ba_iterations,
                  tag=self._epoch)
        from .local_ba import BAWorker, local_bundle_adjust

        self.ba_stats["runs"] += 1
        if self.cfg.ba_sync:
            res = local_bundle_adjust(*args, **kw)
            if res is None:
                self.ba_stats["failed"] += 1
            else:
                self._ba_ready = res
            return
        if self._ba_worker is None:
            self._ba_worker = BAWorker(process=self.cfg.ba_process, nice=self.cfg.ba_nice, idle=self._idle)
            weakref.finalize(self, self._ba_worker.stop)  # a forgotten tracker does not leave its thread behind
        self._ba_worker.submit(*args, **kw)

    def _ba_poll(self):
        if self.cfg.ba_sync:
            res, self._ba_ready = self._ba_ready, None
            return res
        if self._ba_worker is None:
            return None
        w = self._ba_worker
        res = w.poll()
        self.ba_stats["failed"], self.ba_stats["replaced"] = w.failed, w.replaced
        return res

    def _ba_apply(self, res) -> None:
        """Take a finished bundle adjustment (see the module docstring)."""
        st = self.ba_stats
        if res.tag != self._epoch or self.kf_T is None:
            st["stale"] += 1  # from before a tracking restart: another world
            return
        by_index = {kf["index"]: kf for kf in self._win}
        opt = {i: T for i, T in zip(res.kf_ids, res.poses) if i in by_index}
        if not opt:
            st["stale"] += 1
            return
        newest = max(opt)
        C = opt[newest] @ _inv(by_index[newest]["T_wc"])  # the correction of the newest optimised keyframe
        new_T: dict[int, np.ndarray] = {}
        for kf in self._win:
            new_T[kf["index"]] = opt[kf["index"]] if kf["index"] in opt else (
                C @ kf["T_wc"] if kf["index"] > newest else kf["T_wc"])
            kf["T_wc"] = new_T[kf["index"]]
        for n, rec in enumerate(self.keyframes):
            if rec.index in new_T:
                self.keyframes[n] = replace(rec, T_wc=new_T[rec.index].copy())
        self.kf_T = new_T[self.kf_index].copy() if self.kf_index in new_T else C @ self.kf_T
        if self.T_prev is not None:
            self.T_prev = C @ self.T_prev
        # points: the optimised ones, the outliers dropped, every other one moved with the correction
        R, t = C[:3, :3], C[:3, 3]
        good = res.point_err_px <= self.cfg.ba_outlier_px
        order = np.argsort(res.point_ids)
        rid, rX, rgood = res.point_ids[order], res.points[order], good[order]
        rwide = rgood & (res.point_angle_deg[order] >= self.cfg.min_angle_deg)

        def lookup(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if len(rid) == 0:
                return np.zeros(len(ids), bool), np.zeros(len(ids), int)
            j = np.clip(np.searchsorted(rid, ids), 0, len(rid) - 1)
            return rid[j] == ids, j

        hit, j = lookup(self._pt_ids)
        moved = self._pt_X @ R.T + t
        self._pt_X = np.where((hit & rgood[j])[:, None], rX[j], moved)
        keep = ~(hit & ~rgood[j])
        self._pt_ids, self._pt_X = self._pt_ids[keep], self._pt_X[keep]
        hit, j = lookup(self.tid)
        opt_pt, bad_pt = hit & rgood[j], hit & ~rgood[j]
        finite = np.isfinite(self.X).all(1)
        rest = ~hit & finite
        self.X[rest] = self.X[rest] @ R.T + t
        self.X[opt_pt] = rX[j[opt_pt]]
        self.geo[opt_pt] |= rwide[j[opt_pt]]  # a prior point counts as triangulated once it has parallax
        self.refined[opt_pt] = self.geo[opt_pt]
        self.X[bad_pt] = np.nan
        self.geo[bad_pt] = self.refined[bad_pt] = False
        n_out = int((~good).sum())
        st["applied"] += 1
        st["outliers_dropped"] += n_out
        self._ba_sum_ms += res.ms
        self._ba_sum_it += res.iterations
        self._ba_sum_lat += res.latency_ms
        st["mean_latency_ms"] = round(self._ba_sum_lat / st["applied"], 3)
        st["mean_ms"] = round(self._ba_sum_ms / st["applied"], 3)
        st["max_ms"] = round(max(st["max_ms"], res.ms), 3)
        st["mean_iterations"] = round(self._ba_sum_it / st["applied"], 3)
        st["last_error"] = (round(res.initial_error, 3), round(res.final_error, 3))

    def _ba_restart(self) -> None:
        """Tracking restarted from a fallback pose: the window's world no longer connects."""
        self._epoch += 1
        self._win.clear()
        self._pt_ids, self._pt_X = np.zeros(0, np.int64), np.zeros((0, 3))
        self._ba_ready = None
        if self._ba_worker is not None:
            self._ba_worker.discard()

    def apply_correction(self, C: np.ndarray) -> None:
        """Move the whole tracking state onto a corrected world ``x' = C x`` (``C`` a ``(4, 4)`` Sim(3),
        from loop closure): poses, points, keyframe records, the bundle-adjustment window, and the
        depth scale (times ``C``'s scale). A bundle adjustment in flight is discarded (stale)."""
        from .sim3 import correct_pose as pose
        from .sim3 import sim3_parts

        R, t, s = sim3_parts(C)

        def points(X: np.ndarray) -> np.ndarray:
            return s * (X @ R.T) + t  # NaN rows stay NaN

        if self.T_prev is not None:
            self.T_prev = pose(C, self.T_prev)
        if self.kf_T is not None:
            self.kf_T = pose(C, self.kf_T)
        self.X = points(self.X)
        self._pt_X = points(self._pt_X)
        for kf in self._win:
            kf["T_wc"] = pose(C, kf["T_wc"])
        for n, rec in enumerate(self.keyframes):
            self.keyframes[n] = replace(rec, T_wc=pose(C, rec.T_wc), depth_scale=rec.depth_scale * s)
        if self.scale is not None:
            self.scale *= s
        self._epoch += 1
        self._ba_ready = None
        if self._ba_worker is not None:
            self._ba_worker.discard()

    def close(self) -> None:
        """Stop the bundle-adjustment thread (it is a daemon thread: optional)."""
        if self._ba_worker is not None:
            self._ba_worker.close()
            self._ba_worker = None

    def _fallback_depth(self, T_wc: np.ndarray) -> float:
        """A depth prior without the network: the median depth of the triangulated points in view, else 1."""
        if self.geo.any():
            z = _to_cam(T_wc, self.X[self.geo])[:, 2]
            z = z[np.isfinite(z) & (z > 0)]
            if len(z) >= 10:
                return float(np.median(z))
        return 1.0

    def _triangulate(self, K: np.ndarray, T_a: np.ndarray, T_b: np.ndarray, pa: np.ndarray, pb: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """World points of correspondences ``pa`` (camera ``T_a``) / ``pb`` (``T_b``) and which are good."""
        import cv2

        if len(pa) == 0:
            return np.zeros((0, 3)), np.zeros(0, bool)
        Pa = K @ _inv(T_a)[:3]
        Pb = K @ _inv(T_b)[:3]
        Xh = cv2.triangulatePoints(Pa, Pb, pa.T.astype(np.float64), pb.T.astype(np.float64))
        X = (Xh[:3] / Xh[3]).T
        ok = np.isfinite(X).all(1) & (np.abs(Xh[3]) > 1e-12)
        ca, cb = _to_cam(T_a, X), _to_cam(T_b, X)
        ok &= (ca[:, 2] > 0) & (cb[:, 2] > 0)
        ra, rb = X - T_a[:3, 3], X - T_b[:3, 3]
        cosang = np.sum(ra * rb, 1) / (np.linalg.norm(ra, axis=1) * np.linalg.norm(rb, axis=1) + 1e-12)
        ok &= cosang < np.cos(np.deg2rad(self.cfg.min_angle_deg))
        for cam, px in ((ca, pa), (cb, pb)):
            with np.errstate(divide="ignore", invalid="ignore"):
                proj = (cam @ K.T)[:, :2] / cam[:, 2:3]
            ok &= np.linalg.norm(proj - px, axis=1) < self.cfg.max_reproj_px
        return X, ok

    def _update_scale(self, T_wc: np.ndarray, depth_at: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        if not self.geo.any():
            return
        Xc = _to_cam(T_wc, self.X[self.geo])
        z_net = depth_at(self.cur[self.geo], T_wc)
        ok = (Xc[:, 2] > 0) & np.isfinite(z_net) & (z_net > 0)
        if ok.sum() >= 10:
            self.scale = float(np.median(Xc[ok, 2] / z_net[ok]))

    # ------------------------------------------------------------------------------------------

    def _pnp(self, K: np.ndarray, use: np.ndarray, guess: np.ndarray) -> tuple[Optional[np.ndarray], int]:
        import cv2

        obj, img = self.X[use].astype(np.float64), self.cur[use].astype(np.float64)
        if len(obj) < 6:
            return None, 0
        rvec, tvec = _rt(guess)
        ok, rvec, tvec, inl = cv2.solvePnPRansac(obj, img, K, None, rvec, tvec, useExtrinsicGuess=True,
                                                 iterationsCount=100, reprojectionError=self.cfg.pnp_reproj_px,
                                                 confidence=0.999, flags=cv2.SOLVEPNP_ITERATIVE)
        if not ok or inl is None or len(inl) < 6:
            return None, 0
        inl = inl.reshape(-1)
        rvec, tvec = cv2.solvePnPRefineLM(obj[inl], img[inl], K, None, rvec, tvec)
        return _from_rt(rvec, tvec), len(inl)

    def _essential(self, K: np.ndarray) -> tuple[Optional[np.ndarray], int]:
        """Keyframe -> frame from the essential matrix, translation length from the prior depths."""
        import cv2

        pa, pb = self.kf_px.astype(np.float64), self.cur.astype(np.float64)
        if len(pa) < 8:
            return None, 0
        E, mask = cv2.findEssentialMat(pa, pb, K, cv2.RANSAC, 0.999, 1.0)
        if E is None or E.shape != (3, 3):
            return None, 0
        n, R, t, mask = cv2.recoverPose(E, pa, pb, K, mask=mask)
        inl = mask.reshape(-1) > 0
        if n < 8:
            return None, 0
        T_ba = np.eye(4)  # keyframe camera -> frame camera, unit baseline
        T_ba[:3, :3], T_ba[:3, 3] = R, t.reshape(3)
        T_b_unit = self.kf_T @ _inv(T_ba)
        X, ok = self._triangulate(K, self.kf_T, T_b_unit, pa[inl], pb[inl])
        prior = _to_cam(self.kf_T, self.X[inl])[:, 2]
        z_unit = _to_cam(self.kf_T, X)[:, 2]
        good = ok & np.isfinite(prior) & (prior > 0)
        if good.sum() < 8:
            return None, 0
        s = float(np.median(prior[good] / z_unit[good]))
        T_ba[:3, 3] *= s
        return self.kf_T @ _inv(T_ba), int(n)

    def track(self, grey: np.ndarray, K: np.ndarray, depth_at: Callable[[np.ndarray, np.ndarray], np.ndarray],
              fallback_T: np.ndarray, exclude: Optional[np.ndarray] = None) -> TrackResult:
        """Track one frame.

        Args:
            grey: ``(h, w)`` uint8 image at tracking resolution.
            K: ``(3, 3)`` intrinsics in the same pixels.
            depth_at: ``(pixels (N, 2), T_wc (4, 4)) -> (N,)`` the network's depth there (NaN where
                unknown), ``T_wc`` being this frame's pose as tracked (a frame the network did not see
                gets the latest network depth moved to that pose: :mod:`streamrecon.slam.prior`).
            fallback_T: the pose to use when tracking fails (the network's, chained).
            exclude: ``(h, w)`` bool, pixels on moving objects (``--dynamic-mask``): tracks that land
                there are dropped and no corner is detected there.
        """
        with self.busy():  # the bundle-adjustment thread waits while we track (see local_ba)
            self._exclude = exclude if exclude is not None and exclude.shape == grey.shape and exclude.any() else None
            try:
                return self._track(grey, K, depth_at, fallback_T)
            finally:
                self._exclude = None

    @contextmanager
    def busy(self) -> Iterator[None]:
        """The caller's frame loop is working (nestable; :meth:`track` is one such span): the
        bundle-adjustment thread, which holds the GIL while gtsam computes, does not start an
        iteration meanwhile. A pipeline that does more than tracking per frame (``--network-every``:
        taking network results, integrating the map) holds this for the whole frame, so the
        adjustment runs only where the loop waits (:meth:`waiting`) or between frames."""
        self._busy_depth += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._busy_depth -= 1
            if self._busy_depth <= 0:
                self._busy_depth = 0
                self._idle.set()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Inside :meth:`busy`: the frame loop blocks on something else (a busy network), so the
        adjustment may compute now."""
        depth, self._busy_depth = self._busy_depth, 0
        self._idle.set()
        try:
            yield
        finally:
            self._busy_depth = depth
            if depth:
                self._idle.clear()

    def _track_arrays(self) -> tuple:
        return self.cur, self.kf_px, self.X, self.geo, self.tid, self.refined

    def _set_track_arrays(self, a: tuple) -> None:
        self.cur, self.kf_px, self.X, self.geo, self.tid, self.refined = a

    def _estimate(self, K: np.ndarray) -> tuple[Optional[np.ndarray], int, str, int, float]:
        """The frame's pose from the current tracks: ``(T_wc or None, inliers, method, tracked, parallax px)``."""
        tracked = len(self.cur)
        parallax = float(np.median(np.linalg.norm(self.cur - self.kf_px, axis=1))) if tracked else 0.0
        T, inliers, method = None, 0, "fallback"
        known = np.isfinite(self.X).all(1)
        if tracked >= self.cfg.lost_inliers:
            if (self.geo & known).sum() >= self.cfg.min_pnp:
                T, inliers = self._pnp(K, self.geo & known, self.T_prev)
                method = "pnp"
            if T is None and known.sum() >= self.cfg.lost_inliers and self.prior_first:
                T, inliers = self._pnp(K, known, self.T_prev)
                method = "prior"
            if T is None and parallax >= self.cfg.min_parallax_px:
                T, inliers = self._essential(K)
                method = "essential"
            if T is None and known.sum() >= self.cfg.lost_inliers:
                T, inliers = self._pnp(K, known, self.T_prev)
                method = "prior"
        return T, (inliers if T is not None else 0), method, tracked, parallax

    def _track(self, grey: np.ndarray, K: np.ndarray, depth_at: Callable[[np.ndarray, np.ndarray], np.ndarray],
               fallback_T: np.ndarray) -> TrackResult:
        t0 = time.perf_counter()
        self.index += 1
        if self.cfg.local_ba:
            res = self._ba_poll()
            if res is not None:
                self._ba_apply(res)
        if self._prev is None or self.kf_T is None:
            T = fallback_T
            self._prev, self.T_prev = grey, T.copy()
            self._reset_tracks()
            self._ba_restart()
            self._new_keyframe(grey, T, K, depth_at)
            state = "init" if len(self.cur) >= self.cfg.lost_inliers else "lost"
            return TrackResult(T_wc=T.copy(), state=state, method="first", tracked=len(self.cur), inliers=len(self.cur),
                               keyframe=True, depth_scale=self.scale, ms=1e3 * (time.perf_counter() - t0))
        wins = [self.cfg.win] + ([self.cfg.win_retry] if self.cfg.win_retry and self.cfg.win_retry != self.cfg.win else [])
        before = self._track_arrays()
        dropped0, best = self.dynamic_dropped, None
        for attempt, win in enumerate(wins):
            if attempt:  # a weak frame: the same tracks again with the larger window
                self._set_track_arrays(before)
                self.dynamic_dropped = dropped0
                self.retries += 1
            p1, ok = self._flow(self._prev, grey, self.cur, win)
            if self._exclude is not None and len(p1):
                h, w = grey.shape
                u = np.clip(np.rint(p1[:, 0]).astype(int), 0, w - 1)
                on = self._exclude[np.clip(np.rint(p1[:, 1]).astype(int), 0, h - 1), u]
                self.dynamic_dropped += int((ok & on).sum())
                ok &= ~on
            self.cur, self.kf_px, self.X, self.geo = p1[ok], self.kf_px[ok], self.X[ok], self.geo[ok]
            self.tid, self.refined = self.tid[ok], self.refined[ok]
            T, inliers, method, tracked, parallax = self._estimate(K)
            if best is None or inliers > best[1]:
                best = (T, inliers, method, tracked, parallax, self._track_arrays(), self.dynamic_dropped)
            if T is not None and inliers >= self.cfg.ok_inliers:
                break
        T, inliers, method, tracked, parallax, arrays, self.dynamic_dropped = best
        self._set_track_arrays(arrays)
        if T is None or inliers < self.cfg.lost_inliers:
            # lost: take the fallback and start again from this frame
            T = fallback_T.copy()
            self._prev, self.T_prev = grey, T
            self._reset_tracks()
            self._ba_restart()
            self._new_keyframe(grey, T, K, depth_at)
            return TrackResult(T_wc=T, state="lost", method="fallback", tracked=tracked, inliers=inliers, keyframe=True,
                               depth_scale=self.scale, ms=1e3 * (time.perf_counter() - t0))
        state = "ok" if inliers >= self.cfg.ok_inliers else "weak"
        h, w = grey.shape
        kf_parallax = self.cfg.kf_parallax
        if self.ba_available and self.cfg.ba_kf_parallax is not None:
            kf_parallax = self.cfg.ba_kf_parallax
        is_kf = (parallax >= kf_parallax * w or tracked < self.cfg.kf_min_tracked * self.n_kf_tracks
                 or state == "weak")
        X = good = None
        # initialising: the first keyframe as soon as enough triangulate
        if not is_kf and not self.geo.any() and parallax >= self.cfg.init_parallax * w:
            X, good = self._triangulate(K, self.kf_T, T, self.kf_px, self.cur)
            is_kf = int(good.sum()) >= self.cfg.init_points
        if is_kf:
            if X is None:
                X, good = self._triangulate(K, self.kf_T, T, self.kf_px, self.cur)
            if self.cfg.local_ba and self.cfg.ba_keep_points:  # bundle-adjusted points stay
                good = good & ~self.refined
            self.X[good] = X[good]
            self.geo |= good
            self._update_scale(T, depth_at)
            self._new_keyframe(grey, T, K, depth_at)
        elif self.scale is None:
            self._update_scale(T, depth_at)
        self._prev, self.T_prev = grey, T.copy()
        return TrackResult(T_wc=T.copy(), state=state, method=method, tracked=tracked, inliers=inliers, keyframe=is_kf,
                           depth_scale=self.scale, ms=1e3 * (time.perf_counter() - t0))
