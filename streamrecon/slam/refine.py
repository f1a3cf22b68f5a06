"""``--refine``: the final global alignment, after the stream ends (files only).

Over every keyframe in the loop closer's database (:class:`~streamrecon.slam.loop.KeyframeEntry`):

1. **correspondences**: the tracker's own tracks (a corner followed by the flow keeps its id
   across keyframes), joined by ORB matches (ratio test) of the corners along every loop edge
   (and, with ``neighbours``, between nearby keyframes), chained into tracks (union-find);
2. **points**: each track starts at the mean of the positions the tracker triangulated for it,
   else at the triangulation of its first and last views;
3. **joint optimisation**: a global bundle adjustment (gtsam, robust, the first two keyframes
   fixed: gauge and scale) of every keyframe pose and every track point;
4. **pointmaps re-aligned**: each keyframe's scale is re-fitted (median ratio of the adjusted
   points' depths to the depths it had triangulated itself, in the units its network cloud was
   scaled to) and its cloud placed at the refined pose -> the
   refined map; every frame's pose follows its reference keyframe (the newest keyframe at or
   before it): ``T_refined = C_k T_online`` with ``C_k = S_k,refined S_k,online^-1``.

This is DUSt3R's global alignment in spirit (keyframe pointmaps and poses aligned jointly) with
reprojection residuals instead of the network's 3D ones, so that it stays right with weights whose
depth is poor; the network's confidence weights the refined map (voxel fusion keeps the most
confident), not the poses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .loop import KeyframeEntry
from .sim3 import LoopEdge, correct_pose, sim3, sim3_inv, sim3_parts

__all__ = ["RefineResult", "refine_keyframes", "refined_trajectory"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineResult:
    """Attributes:
        kf_ids: keyframe ids; poses: ``(K, 4, 4)`` refined ``S_wk`` (Sim(3): rotation, centre, scale).
        map_xyz, map_rgb, map_conf: the keyframe clouds at the refined poses (before voxelisation).
        tracks, observations: the problem's size; error_px: median reprojection error before/after.
        ms: wall time.
    """

    kf_ids: np.ndarray
    poses: np.ndarray
    map_xyz: np.ndarray
    map_rgb: np.ndarray
    map_conf: np.ndarray
    tracks: int
    observations: int
    error_px: tuple
    ms: float


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.p = np.arange(n)

    def find(self, a: int) -> int:
        p = self.p
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.p[max(ra, rb)] = min(ra, rb)


def _matches(a: KeyframeEntry, b: KeyframeEntry, ratio: float) -> np.ndarray:
    import cv2

    if len(a.lm_desc) < 2 or len(b.lm_desc) < 2:
        return np.zeros((0, 2), int)
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a.lm_desc, b.lm_desc, k=2)
    m = [(p[0].queryIdx, p[0].trainIdx) for p in pairs if len(p) == 2 and p[0].distance < ratio * p[1].distance]
    return np.asarray(m, int).reshape(-1, 2)


def _reproj(K, T_wc, X, px) -> np.ndarray:
    c = (X - T_wc[:3, 3]) @ T_wc[:3, :3]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (c @ K.T)[:, :2] / c[:, 2:3]
    return np.linalg.norm(p - px, axis=1)


def refine_keyframes(entries: Sequence[KeyframeEntry], loops: Sequence[LoopEdge] = (), neighbours: int = 0,
                     ratio: float = 0.8, iterations: int = 30, max_init_px: float = 6.0) -> Optional[RefineResult]:
    """The global alignment (see the module docstring); ``None`` with fewer than 3 keyframes."""
    from .local_ba import local_bundle_adjust

    t0 = time.perf_counter()
    E = list(entries)
    if len(E) < 3:
        return None
    offs = np.cumsum([0] + [len(e.lm_px) for e in E])
    uf = _UnionFind(int(offs[-1]))
    pos = {e.kid: n for n, e in enumerate(E)}
    # the tracker's own correspondences: one track id = one point followed by the flow
    first_of: dict[int, int] = {}
    for n, e in enumerate(E):
        for i, tid in enumerate(e.lm_ids):
            if tid < 0:
                continue
            g = offs[n] + i
            if tid in first_of:
                uf.union(first_of[tid], g)
            else:
                first_of[tid] = g
    # plus ORB matches along the loop edges (and, with ``neighbours``, between nearby keyframes)
    pairs = {(n, m) for n in range(len(E)) for m in range(n + 1, min(len(E), n + 1 + neighbours))}
    pairs |= {tuple(sorted((pos[ed.i], pos[ed.j]))) for ed in loops if ed.i in pos and ed.j in pos}
    for n, m in sorted(pairs):
        for i, j in _matches(E[n], E[m], ratio):
            uf.union(offs[n] + i, offs[m] + j)
    roots = np.array([uf.find(k) for k in range(offs[-1])]) if offs[-1] else np.zeros(0, int)
    ids, counts = np.unique(roots, return_counts=True)
    multi = set(ids[counts >= 2].tolist())
    # initial points: the mean of the keyframes' own (network) points in the world
    Ts, scales = [], []
    for e in E:
        R, t, s = sim3_parts(e.S_wk)
        T = np.eye(4)
        T[:3, :3], T[:3, 3] = R, t
        Ts.append(T)
        scales.append(s)
    K = np.median(np.stack([e.K for e in E]), axis=0)
    sums: dict[int, np.ndarray] = {}
    cnt: dict[int, int] = {}
    first: dict[int, tuple] = {}
    last: dict[int, tuple] = {}
    obs, sels = [], []  # per keyframe: (track ids, pixels) of its multi-view corners, and which corners
    for n, e in enumerate(E):
        r = roots[offs[n]:offs[n + 1]]
        sel = np.isin(r, list(multi)) if len(r) else np.zeros(0, bool)
        sels.append(sel)
        obs.append((r[sel].astype(np.int64), e.lm_px[sel].astype(np.float64)))
        Xw = e.lm_X[sel].astype(np.float64) @ e.S_wk[:3, :3].T + e.S_wk[:3, 3]  # NaN: not triangulated
        for rid, X, px in zip(r[sel], Xw, e.lm_px[sel]):
            first.setdefault(rid, (n, px))
            last[rid] = (n, px)
            if np.isfinite(X).all():
                sums[rid] = sums.get(rid, 0.0) + X
                cnt[rid] = cnt.get(rid, 0) + 1
    # tracks no keyframe triangulated: from their first and last views (DLT), kept in front of both
    groups: dict[tuple, list] = {}
    for rid in multi - set(sums):
        (na, pa), (nb, pb) = first[rid], last[rid]
        if na != nb:
            groups.setdefault((na, nb), []).append((rid, pa, pb))
    import cv2

    for (na, nb), items in groups.items():
        Pa = K @ np.linalg.inv(Ts[na])[:3]
        Pb = K @ np.linalg.inv(Ts[nb])[:3]
        pa = np.array([x[1] for x in items], np.float64).T
        pb = np.array([x[2] for x in items], np.float64).T
        Xh = cv2.triangulatePoints(Pa, Pb, pa, pb)
        with np.errstate(divide="ignore", invalid="ignore"):
            X = (Xh[:3] / Xh[3]).T
        za = ((X - Ts[na][:3, 3]) @ Ts[na][:3, :3])[:, 2]
        zb = ((X - Ts[nb][:3, 3]) @ Ts[nb][:3, :3])[:, 2]
        for (rid, _, _), x, ok in zip(items, X, np.isfinite(X).all(1) & (za > 0) & (zb > 0)):
            if ok:
                sums[rid], cnt[rid] = x, 1
    pid = np.array(sorted(sums), np.int64)
    if len(pid) < 12:
        return None
    P = np.stack([sums[k] / cnt[k] for k in pid])
    before = np.concatenate([_reproj(K, Ts[n], P[np.searchsorted(pid, o[0][np.isin(o[0], pid)])],
                                     o[1][np.isin(o[0], pid)]) for n, o in enumerate(obs)])
    res = local_bundle_adjust(K, Ts, obs, pid, P, kf_ids=[e.kid for e in E], n_fixed=2, iterations=iterations,
                              max_init_px=max_init_px, min_points=12, min_kf_obs=6)
    if res is None:
        return None
    newT = {k: T for k, T in zip(res.kf_ids, res.poses)}
    ok = res.point_err_px <= 3.0
    bp = res.point_ids[ok]
    bX = res.points[ok]
    order = np.argsort(bp)
    bp, bX = bp[order], bX[order]
    poses, xyz, rgb, conf, after = [], [], [], [], []
    for n, e in enumerate(E):
        T = newT.get(e.kid, Ts[n])
        r, px = obs[n]
        j = np.clip(np.searchsorted(bp, r), 0, max(0, len(bp) - 1))
        hit = (bp[j] == r) if len(bp) else np.zeros(len(r), bool)
        s = scales[n]
        if hit.sum() >= 10:
            own = e.lm_X[sels[n]][hit, 2].astype(np.float64)
            z = ((bX[j[hit]] - T[:3, 3]) @ T[:3, :3])[:, 2]
            good = np.isfinite(own) & (own > 0) & (z > 0)
            if good.sum() >= 10:
                s = float(np.median(z[good] / own[good]))
            after.append(_reproj(K, T, bX[j[hit]], px[hit]))
        S = sim3(T[:3, :3], T[:3, 3], s)
        poses.append(S)
        xyz.append(e.cloud.astype(np.float32) @ S[:3, :3].T.astype(np.float32) + S[:3, 3].astype(np.float32))
        rgb.append(e.colors)
        conf.append(e.conf.astype(np.float32))
    err_after = float(np.median(np.concatenate(after))) if after else float("nan")
    ms = 1e3 * (time.perf_counter() - t0)
    _logger.info("refine: %d keyframes, %d tracks, %d observations, reprojection %.2f -> %.2f px, %.0f ms",
                 len(E), len(pid), res.n_obs, float(np.nanmedian(before)), err_after, ms)
    return RefineResult(np.array([e.kid for e in E], np.int64), np.stack(poses), np.concatenate(xyz),
                        np.concatenate(rgb), np.concatenate(conf), len(pid), int(res.n_obs),
                        (float(np.nanmedian(before)), err_after), ms)


def refined_trajectory(poses: np.ndarray, kf_rows: np.ndarray, kf_online: np.ndarray, kf_new: np.ndarray,
                       frame_epochs: Optional[np.ndarray] = None, corrections: Optional[dict] = None) -> np.ndarray:
    """Every frame's ``T_wc`` moved with its reference keyframe (the newest at or before it).

    Args:
        poses: ``(F, 4, 4)`` the online trajectory, one row per frame.
        kf_rows: ``(K,)`` the keyframes' rows in ``poses``, increasing.
        kf_online: ``(K, 4, 4)`` their poses as emitted (``poses[kf_rows]``); kf_new: ``(K, 4, 4)``
            their revised ``S_wk``.
        frame_epochs: ``(F,)`` the loop-closure epoch each frame was emitted in; with
            ``corrections`` (epoch ``e`` -> the Sim(3) ``C`` that started it) a keyframe's online
            pose is first brought into its frame's epoch, so a frame already corrected online is
            not corrected twice.
    """
    out = poses.copy()
    if len(kf_rows) == 0:
        return out
    ref = np.maximum(np.searchsorted(kf_rows, np.arange(len(poses)), side="right") - 1, 0)
    for n in range(len(poses)):
        k = ref[n]
        T_k = kf_online[k]
        if frame_epochs is not None and corrections:
            for e in range(int(frame_epochs[kf_rows[k]]) + 1, int(frame_epochs[n]) + 1):
                if e in corrections:
                    T_k = corrections[e] @ T_k
        out[n] = correct_pose(kf_new[k] @ sim3_inv(T_k), poses[n])
    return out
