"""Sim(3) transforms as ``(4, 4)`` matrices ``[[s R, t], [0, 1]]``, and the Sim(3) pose graph.

A keyframe's pose in the SLAM backend is ``S_wk``: keyframe-camera coordinates -> world,
``x_w = s R x_k + t``. With ``s = 1`` it is the usual ``T_wc``. Composition is the matrix product
and the inverse the matrix inverse, so SE(3) code keeps working on them.

:func:`optimize_pose_graph` corrects a chain of keyframe poses with loop constraints (gtsam's
``BetweenFactorSimilarity3``, Levenberg-Marquardt): the odometry edges are the keyframes'
relative poses as they are, the loop edges the verified relative Sim(3) between two keyframes
far apart in time; the first keyframe is held fixed (the gauge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["ODOM_ROT", "LOOP_ROT", "correct_pose", "sim3", "sim3_parts", "sim3_inv", "sim3_apply", "umeyama",
           "LoopEdge", "PoseGraphResult", "optimize_pose_graph"]


def sim3(R: np.ndarray, t: np.ndarray, s: float = 1.0) -> np.ndarray:
    """``(4, 4)`` ``[[s R, t], [0, 1]]``."""
    M = np.eye(4)
    M[:3, :3] = s * np.asarray(R, np.float64)
    M[:3, 3] = np.asarray(t, np.float64).reshape(3)
    return M


def sim3_parts(M: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(R (3, 3), t (3,), s)`` of a Sim(3) matrix (``s > 0``; ``R`` re-orthonormalised)."""
    A = M[:3, :3]
    s = float(np.cbrt(np.linalg.det(A)))
    if not s > 0:
        raise ValueError(f"not a Sim(3) transform (det {np.linalg.det(A):.3g})")
    U, _, Vt = np.linalg.svd(A / s)
    R = U @ Vt
    if np.linalg.det(R) < 0:
        U[:, -1] *= -1
        R = U @ Vt
    return R, M[:3, 3].copy(), s


def sim3_inv(M: np.ndarray) -> np.ndarray:
    """The inverse: ``[[R^T / s, -R^T t / s], [0, 1]]``."""
    R, t, s = sim3_parts(M)
    return sim3(R.T, -(R.T @ t) / s, 1.0 / s)


def sim3_apply(M: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``(N, 3)`` points through ``M``."""
    return X @ M[:3, :3].T + M[:3, 3]


def correct_pose(C: np.ndarray, T_wc: np.ndarray) -> np.ndarray:
    """An SE(3) camera pose moved into the world ``x' = C x`` (``C`` Sim(3)): the camera stays rigid,
    ``R' = R_C R``, ``t' = s_C R_C t + t_C``."""
    R, t, s = sim3_parts(C)
    out = np.eye(4)
    out[:3, :3] = R @ T_wc[:3, :3]
    out[:3, 3] = s * (R @ T_wc[:3, 3]) + t
    return out


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool = True) -> np.ndarray:
    """The Sim(3) (or SE(3)) ``M`` minimising ``sum |dst - M src|^2`` (Umeyama 1991); ``(N, 3)`` each, N >= 3."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 3:
        raise ValueError(f"umeyama needs two (N, 3) arrays with N >= 3, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    U, D, Vt = np.linalg.svd(b.T @ a / len(src))
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1
    R = U @ S @ Vt
    var = (a ** 2).sum() / len(src)
    s = float(np.trace(np.diag(D) @ S) / var) if with_scale and var > 0 else 1.0
    return sim3(R, mu_d - s * R @ mu_s, s)


@dataclass(frozen=True)
class LoopEdge:
    """A verified constraint ``S_ij`` (keyframe ``j``'s camera -> keyframe ``i``'s camera) between
    keyframes with ids ``i`` and ``j``; ``inliers`` is the verification's support, ``depth`` the
    median distance of its landmarks from camera ``i`` (what its translation's accuracy scales with)."""

    i: int
    j: int
    S_ij: np.ndarray
    inliers: int = 0
    depth: float = 1.0


@dataclass(frozen=True)
class PoseGraphResult:
    """Optimised ``S_wk`` per keyframe id, the graph's error before/after, iterations, milliseconds."""

    poses: dict
    initial_error: float
    final_error: float
    iterations: int
    ms: float


def _to_gtsam(M: np.ndarray):
    """gtsam's ``Similarity3(R, t, s)`` maps ``x -> s (R x + t)``: its ``t`` is ours over ``s``."""
    import gtsam

    R, t, s = sim3_parts(M)
    return gtsam.Similarity3(gtsam.Rot3(R), np.asarray(t, np.float64) / s, float(s))


def _from_gtsam(S) -> np.ndarray:
    s = float(S.scale())
    return sim3(S.rotation().matrix(), s * np.asarray(S.translation()), s)


ODOM_ROT = 0.002  # rad per keyframe step: the pose graph's model of tracking drift
LOOP_ROT = 0.005  # rad: a verified loop edge's rotation


def optimize_pose_graph(ids: Sequence[int], poses: Sequence[np.ndarray], loops: Sequence[LoopEdge],
                        odom_rot: float = ODOM_ROT, odom_trans: float = 0.05, odom_trans_min: float = 0.002,
                        odom_scale: float = 0.005, loop_rot: float = LOOP_ROT, loop_trans: float = 0.01,
                        loop_scale: float = 0.02, huber_k: Optional[float] = None,
                        iterations: int = 50) -> PoseGraphResult:
    """Correct keyframe poses (in ``ids`` order, a chain) with loop edges.

    Args:
        ids: keyframe ids, in time order.
        poses: their ``S_wk`` (``(4, 4)`` Sim(3)); the first one stays fixed.
        loops: loop edges between ids in ``ids``.
        odom_rot, odom_trans, odom_trans_min, odom_scale: an odometry edge's standard deviations:
            rotation (rad), translation (``odom_trans`` of the step's length, at least
            ``odom_trans_min``), log-scale -- tracking drifts in proportion to the motion.
        loop_rot, loop_trans, loop_scale: a loop edge's: rotation (rad), translation
            (``loop_trans`` of the edge's ``depth``, the median distance of its landmarks: a PnP
            on triangulated points is as good as their depth), log-scale. With small drift a loop
            moves little; after a long drift it wins. Loop edges are not down-weighted by a robust
            kernel unless ``huber_k`` is given (a verified loop's residual is large *because* the
            odometry drifted).

    Returns:
        :class:`PoseGraphResult` with the optimised pose of every id.
    """
    import time

    import gtsam

    t0 = time.perf_counter()
    if len(ids) != len(poses) or len(ids) < 2:
        raise ValueError("the pose graph needs at least two keyframes, one pose each")
    key = {k: n for n, k in enumerate(ids)}
    graph = gtsam.NonlinearFactorGraph()
    values = gtsam.Values()

    def noise(rot: float, trans: float, scale: float):
        # gtsam's Similarity3 tangent: rotation (3), translation (3), log-scale (1)
        return gtsam.noiseModel.Diagonal.Sigmas(np.array([rot] * 3 + [trans] * 3 + [scale], np.float64))

    for n, P in enumerate(poses):
        values.insert(n, _to_gtsam(P))
    graph.add(gtsam.NonlinearEqualitySimilarity3(0, _to_gtsam(poses[0])))
    for n in range(len(poses) - 1):
        rel = sim3_inv(poses[n]) @ poses[n + 1]
        step = float(np.linalg.norm(rel[:3, 3]))
        graph.add(gtsam.BetweenFactorSimilarity3(n, n + 1, _to_gtsam(rel),
                                                 noise(odom_rot, max(odom_trans_min, odom_trans * step), odom_scale)))
    for e in loops:
        if e.i not in key or e.j not in key:
            continue
        m = noise(loop_rot, loop_trans * max(e.depth, 1e-3), loop_scale)
        if huber_k:
            m = gtsam.noiseModel.Robust.Create(gtsam.noiseModel.mEstimator.Huber.Create(huber_k), m)
        graph.add(gtsam.BetweenFactorSimilarity3(key[e.i], key[e.j], _to_gtsam(e.S_ij), m))
    params = gtsam.LevenbergMarquardtParams()
    params.setMaxIterations(iterations)
    opt = gtsam.LevenbergMarquardtOptimizer(graph, values, params)
    e0 = graph.error(values)
    out = opt.optimize()
    e1 = graph.error(out)
    res = {k: _from_gtsam(out.atSimilarity3(n)) for k, n in key.items()}
    return PoseGraphResult(res, float(e0), float(e1), int(opt.iterations()), 1e3 * (time.perf_counter() - t0))
