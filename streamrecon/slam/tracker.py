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

Poses are ``T_wc`` (camera-to-world, OpenCV axes), in the world of the first frame.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

__all__ = ["TrackerConfig", "TrackResult", "Tracker", "KeyframeRecord"]


@dataclass(frozen=True)
class TrackerConfig:
    max_features: int = 400
    min_distance: int = 10
    quality: float = 0.005
    win: int = 21
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


@dataclass(frozen=True)
class TrackResult:
    """Attributes:
        T_wc: ``(4, 4)`` the frame's pose (the fallback's when ``state == "lost"``).
        state: ``init``, ``ok``, ``weak`` or ``lost``.
        method: ``first``, ``pnp``, ``essential``, ``prior`` (PnP on prior points), ``fallback``.
        tracked: tracks that survived into this frame; inliers: those the pose agrees with.
        keyframe: whether this frame became a keyframe.
        depth_scale: multiply the network depth by this to match the map (None: no estimate yet).
        ms: time spent.
    """

    T_wc: np.ndarray
    state: str
    method: str
    tracked: int
    inliers: int
    keyframe: bool
    depth_scale: Optional[float]
    ms: float


@dataclass(frozen=True)
class KeyframeRecord:
    """A keyframe as kept in the bounded database: frame index, pose, depth scale, its corners."""

    index: int
    T_wc: np.ndarray
    depth_scale: float
    keypoints: np.ndarray  # (N, 2) float32, tracking pixels


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
        self._reset_tracks()
        self.T_prev: Optional[np.ndarray] = None
        self.kf_T: Optional[np.ndarray] = None
        self.kf_index = -1
        self.scale: Optional[float] = None
        self.index = -1

    def _reset_tracks(self) -> None:
        self.cur = np.zeros((0, 2), np.float32)  # pixel in the previous / current frame
        self.kf_px = np.zeros((0, 2), np.float32)  # pixel in the keyframe
        self.X = np.zeros((0, 3))  # world point (NaN: unknown)
        self.geo = np.zeros(0, bool)  # X from triangulation (else from the network prior)
        self.n_kf_tracks = 0

    # ------------------------------------------------------------------------------------------

    def _detect(self, grey: np.ndarray, existing: np.ndarray, n: int) -> np.ndarray:
        import cv2

        if n <= 0:
            return np.zeros((0, 2), np.float32)
        mask = np.full(grey.shape, 255, np.uint8)
        for x, y in existing.astype(int):
            cv2.circle(mask, (int(x), int(y)), self.cfg.min_distance, 0, -1)
        pts = cv2.goodFeaturesToTrack(grey, maxCorners=n, qualityLevel=self.cfg.quality,
                                      minDistance=self.cfg.min_distance, mask=mask, blockSize=5)
        return np.zeros((0, 2), np.float32) if pts is None else pts.reshape(-1, 2).astype(np.float32)

    def _flow(self, a: np.ndarray, b: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        if len(pts) == 0:
            return pts, np.zeros(0, bool)
        lk = dict(winSize=(self.cfg.win, self.cfg.win), maxLevel=self.cfg.levels,
                  criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
        p1, st1, _ = cv2.calcOpticalFlowPyrLK(a, b, pts.reshape(-1, 1, 2), None, **lk)
        p0, st0, _ = cv2.calcOpticalFlowPyrLK(b, a, p1, None, **lk)
        p1, p0 = p1.reshape(-1, 2), p0.reshape(-1, 2)
        h, w = a.shape
        ok = (st1.reshape(-1) == 1) & (st0.reshape(-1) == 1) & (np.linalg.norm(p0 - pts, axis=1) < self.cfg.fb_px)
        ok &= (p1[:, 0] >= 0) & (p1[:, 0] < w) & (p1[:, 1] >= 0) & (p1[:, 1] < h)
        return p1, ok

    def _new_keyframe(self, grey: np.ndarray, T_wc: np.ndarray, K: np.ndarray,
                      depth_at: Callable[[np.ndarray], np.ndarray]) -> None:
        """Make this frame the keyframe: keep the surviving tracks, add corners with prior 3D points."""
        new = self._detect(grey, self.cur, self.cfg.max_features - len(self.cur))
        if len(new):
            z = depth_at(new) * (self.scale or 1.0)
            rays = np.c_[new, np.ones(len(new))] @ np.linalg.inv(K).T
            Xc = rays * z[:, None]
            Xw = Xc @ T_wc[:3, :3].T + T_wc[:3, 3]
            Xw[~(np.isfinite(z) & (z > 0))] = np.nan
            self.cur = np.vstack([self.cur, new])
            self.X = np.vstack([self.X, Xw])
            self.geo = np.concatenate([self.geo, np.zeros(len(new), bool)])
        self.kf_px = self.cur.copy()
        self.kf_T = T_wc.copy()
        self.kf_index = self.index
        self.n_kf_tracks = len(self.cur)
        self.n_keyframes += 1
        self.keyframes.append(KeyframeRecord(self.index, T_wc.copy(), float(self.scale or 1.0), self.cur.copy()))

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

    def _update_scale(self, T_wc: np.ndarray, depth_at: Callable[[np.ndarray], np.ndarray]) -> None:
        if not self.geo.any():
            return
        Xc = _to_cam(T_wc, self.X[self.geo])
        z_net = depth_at(self.cur[self.geo])
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

    def track(self, grey: np.ndarray, K: np.ndarray, depth_at: Callable[[np.ndarray], np.ndarray],
              fallback_T: np.ndarray) -> TrackResult:
        """Track one frame.

        Args:
            grey: ``(h, w)`` uint8 image at tracking resolution.
            K: ``(3, 3)`` intrinsics in the same pixels.
            depth_at: ``(N, 2)`` pixels -> ``(N,)`` the network's depth there (NaN where unknown).
            fallback_T: the pose to use when tracking fails (the network's, chained).
        """
        t0 = time.perf_counter()
        self.index += 1
        if self._prev is None or self.kf_T is None:
            T = fallback_T if self.T_prev is None else fallback_T
            self._prev, self.T_prev = grey, T.copy()
            self._reset_tracks()
            self._new_keyframe(grey, T, K, depth_at)
            state = "init" if len(self.cur) >= self.cfg.lost_inliers else "lost"
            return TrackResult(T.copy(), state, "first", len(self.cur), len(self.cur), True, self.scale,
                               1e3 * (time.perf_counter() - t0))
        p1, ok = self._flow(self._prev, grey, self.cur)
        self.cur, self.kf_px, self.X, self.geo = p1[ok], self.kf_px[ok], self.X[ok], self.geo[ok]
        tracked = len(self.cur)
        parallax = float(np.median(np.linalg.norm(self.cur - self.kf_px, axis=1))) if tracked else 0.0
        T, inliers, method = None, 0, "fallback"
        known = np.isfinite(self.X).all(1)
        if tracked >= self.cfg.lost_inliers:
            if (self.geo & known).sum() >= self.cfg.min_pnp:
                T, inliers = self._pnp(K, self.geo & known, self.T_prev)
                method = "pnp"
            if T is None and parallax >= self.cfg.min_parallax_px:
                T, inliers = self._essential(K)
                method = "essential"
            if T is None and known.sum() >= self.cfg.lost_inliers:
                T, inliers = self._pnp(K, known, self.T_prev)
                method = "prior"
        if T is None or inliers < self.cfg.lost_inliers:
            # lost: take the fallback and start again from this frame
            T = fallback_T.copy()
            self._prev, self.T_prev = grey, T
            self._reset_tracks()
            self._new_keyframe(grey, T, K, depth_at)
            return TrackResult(T, "lost", "fallback", tracked, inliers, True, self.scale,
                               1e3 * (time.perf_counter() - t0))
        state = "ok" if inliers >= self.cfg.ok_inliers else "weak"
        h, w = grey.shape
        is_kf = (parallax >= self.cfg.kf_parallax * w or tracked < self.cfg.kf_min_tracked * self.n_kf_tracks
                 or state == "weak")
        if is_kf:
            X, good = self._triangulate(K, self.kf_T, T, self.kf_px, self.cur)
            self.X[good] = X[good]
            self.geo |= good
            self._update_scale(T, depth_at)
            self._new_keyframe(grey, T, K, depth_at)
        elif self.scale is None:
            self._update_scale(T, depth_at)
        self._prev, self.T_prev = grey, T.copy()
        return TrackResult(T.copy(), state, method, tracked, inliers, is_kf, self.scale,
                           1e3 * (time.perf_counter() - t0))
