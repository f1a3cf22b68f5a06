"""Accuracy metrics: depth, trajectory (ATE/RPE with Sim(3)/SE(3) alignment), map.

All numpy. ``T`` arrays are ``(N, 4, 4)`` camera-to-world.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["depth_metrics", "umeyama", "ate", "rpe", "path_length", "map_metrics", "associate", "rotation_angle_deg",
           "trajectory_metrics"]


def associate(stamps_a: np.ndarray, stamps_b: np.ndarray, max_dt: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(ia, ib)`` matching each stamp of ``a`` to the nearest unused stamp of ``b``
    within ``max_dt`` seconds (greedy by time difference, like evo's ``associate_trajectories``)."""
    a, b = np.asarray(stamps_a, np.float64), np.asarray(stamps_b, np.float64)
    order = np.argsort(b)
    pos = np.clip(np.searchsorted(b[order], a), 1, len(b) - 1) if len(b) > 1 else np.zeros(len(a), int)
    cands = []
    for i, p in enumerate(pos):
        for j in {order[p], order[max(p - 1, 0)]}:
            dt = abs(a[i] - b[j])
            if dt <= max_dt:
                cands.append((dt, i, j))
    used_a, used_b, ia, ib = set(), set(), [], []
    for _dt, i, j in sorted(cands):
        if i not in used_a and j not in used_b:
            used_a.add(i), used_b.add(j)
            ia.append(i), ib.append(j)
    keep = np.argsort(ia)
    return np.asarray(ia, int)[keep], np.asarray(ib, int)[keep]


def depth_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """AbsRel and delta<1.25 of one depth map, metric and after median scaling.

    Args:
        pred, gt: ``(H, W)`` depths; valid: ``(H, W)`` bool (GT available, > 0).
    """
    m = valid & np.isfinite(pred) & (pred > 0) & (gt > 0)
    if m.sum() < 10:
        return {"abs_rel": math.nan, "delta1": math.nan, "abs_rel_metric": math.nan, "delta1_metric": math.nan,
                "scale": math.nan}
    p, g = pred[m].astype(np.float64), gt[m].astype(np.float64)
    out = {}
    scale = float(np.median(g) / np.median(p))
    for suffix, s in (("", scale), ("_metric", 1.0)):
        ps = p * s
        out[f"abs_rel{suffix}"] = float(np.mean(np.abs(ps - g) / g))
        out[f"delta1{suffix}"] = float(np.mean(np.maximum(ps / g, g / ps) < 1.25))
    out["scale"] = scale
    return out


def umeyama(src: np.ndarray, dst: np.ndarray, with_scale: bool) -> tuple[float, np.ndarray, np.ndarray]:
    """``(s, R, t)`` minimising ``sum |dst - (s R src + t)|^2`` (Umeyama 1991). ``src``, ``dst``: ``(N, 3)``."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    U, D, Vt = np.linalg.svd(cov)
    S = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2, 2] = -1
    R = U @ S @ Vt
    var_s = (xs ** 2).sum() / len(src)
    s = float(np.trace(np.diag(D) @ S) / var_s) if with_scale and var_s > 1e-12 else 1.0
    return s, R, mu_d - s * R @ mu_s


def path_length(T: np.ndarray) -> float:
    p = T[:, :3, 3]
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum())


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Angle in degrees of rotation matrices ``(..., 3, 3)``.

    The matrices are first projected onto the nearest rotation (SVD) and the angle is
    ``atan2(|vee(R - R^T)| / 2, (tr R - 1) / 2)``: ``arccos((tr R - 1) / 2)`` alone is ill-conditioned
    for small angles, and poses stored with a few significant digits (SUN3D's are orthonormal to only
    ~5e-6) make it 25 % low at 0.25 deg per frame.
    """
    R = np.asarray(R, dtype=np.float64)
    U, _, Vt = np.linalg.svd(R)
    D = np.ones(R.shape[:-1])
    D[..., -1] = np.sign(np.linalg.det(U @ Vt))
    R = (U * D[..., None, :]) @ Vt
    w = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    return np.degrees(np.arctan2(np.linalg.norm(w, axis=-1) / 2, (np.trace(R, axis1=-2, axis2=-1) - 1) / 2))


def _align(pred: np.ndarray, gt: np.ndarray, with_scale: bool) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    s, R, t = umeyama(pred[:, :3, 3], gt[:, :3, 3], with_scale)
    out = pred.copy()
    out[:, :3, :3] = R @ pred[:, :3, :3]
    out[:, :3, 3] = (s * (R @ pred[:, :3, 3].T)).T + t
    return out, s, R, t


def ate(pred: np.ndarray, gt: np.ndarray, with_scale: bool) -> dict[str, float]:
    """Absolute trajectory error: RMSE of camera centres after Umeyama alignment (Sim(3) or SE(3)).

    A degenerate estimate (all centres equal, e.g. identity poses) is aligned with scale 1: its error is
    the spread of the ground truth around its centroid, the largest error any Sim(3)-aligned estimate
    can have. A non-finite estimate gives NaN errors.
    """
    length = path_length(gt)
    if not np.isfinite(pred).all():
        return {"rmse": math.nan, "scale": math.nan, "path_length": length, "percent_of_path": math.nan}
    aligned, s, _, _ = _align(pred, gt, with_scale)
    err = np.linalg.norm(aligned[:, :3, 3] - gt[:, :3, 3], axis=1)
    rmse = float(np.sqrt(np.mean(err ** 2)))
    return {"rmse": rmse, "scale": s, "path_length": length,
            "percent_of_path": 100.0 * rmse / length if length > 1e-9 else math.nan}


def rpe(pred: np.ndarray, gt: np.ndarray, delta: int = 1, with_scale: bool = False) -> dict[str, float]:
    """Relative pose error over ``delta`` frames: translation RMSE (after the Sim(3) scale when asked)
    and rotation RMSE in degrees (per ``delta`` frames)."""
    if not np.isfinite(pred).all():
        return {"trans_rmse": math.nan, "rot_rmse_deg": math.nan}
    s = _align(pred, gt, True)[1] if with_scale else 1.0
    te, re = [], []
    for i in range(len(gt) - delta):
        dp = np.linalg.inv(pred[i]) @ pred[i + delta]
        dg = np.linalg.inv(gt[i]) @ gt[i + delta]
        dp[:3, 3] *= s
        e = np.linalg.inv(dg) @ dp
        te.append(np.linalg.norm(e[:3, 3]))
        re.append(float(rotation_angle_deg(e[:3, :3])))
    if not te:
        return {"trans_rmse": math.nan, "rot_rmse_deg": math.nan}
    return {"trans_rmse": float(np.sqrt(np.mean(np.square(te)))), "rot_rmse_deg": float(np.sqrt(np.mean(np.square(re))))}


def trajectory_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The trajectory figures ``streamrecon eval`` reports (the same as in its per-sequence scores):
    ATE after Sim(3) and SE(3) alignment (RMSE in metres and in % of the GT path length), the Sim(3)
    scale, and RPE over one frame (rotation degrees/frame; translation after the Sim(3) scale)."""
    sim3, se3 = ate(pred, gt, True), ate(pred, gt, False)
    r = rpe(pred, gt, 1, with_scale=True)
    return {"ate_sim3": sim3["rmse"], "ate_sim3_pct": sim3["percent_of_path"], "sim3_scale": sim3["scale"],
            "ate_se3": se3["rmse"], "ate_se3_pct": se3["percent_of_path"], "path_length": sim3["path_length"],
            "rpe_trans": r["trans_rmse"], "rpe_rot_deg": r["rot_rmse_deg"]}


def _nearest(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each point of ``a`` ``(N, 3)`` to its nearest neighbour in ``b`` ``(M, 3)`` (k-d tree)."""
    from scipy.spatial import cKDTree

    if len(a) == 0:
        return np.zeros(0)
    return cKDTree(np.asarray(b, np.float64)).query(np.asarray(a, np.float64), k=1, workers=1)[0]


#: distance (m, after alignment) within which a point counts as matched: precision, coverage, F-score
MAP_TAU = 0.05
MAP_KEYS = ("accuracy", "completeness", "precision", "coverage", "fscore", "map_points")


def map_metrics(pred: np.ndarray, gt: np.ndarray, tau: float = MAP_TAU, max_points: int = 200_000,
                seed: int = 0) -> dict[str, float]:
    """Two world point clouds ``(N, 3)`` / ``(M, 3)`` (aligned, metres) compared both ways.

    * ``accuracy``: mean distance predicted -> nearest GT point (lower is better). Alone it rewards a
      small cloud in the right place: one point on a wall scores ~0.
    * ``completeness``: mean distance from every GT point (the whole GT of the scored frames) to the
      nearest predicted point.
    * ``precision`` / ``coverage``: the fraction of predicted / GT points within ``tau`` of the other
      cloud; ``fscore`` their harmonic mean (Tanks and Temples' F-score). A degenerate map (a tiny or
      collapsed cloud) keeps a high precision but gets a coverage and F-score near 0.
    * ``map_points``: the size of the predicted cloud (before the ``max_points`` subsample).
    """
    if len(pred) == 0 or len(gt) == 0:
        return {k: math.nan for k in MAP_KEYS} | {"map_points": float(len(pred))}
    n_pred = len(pred)
    rng = np.random.default_rng(seed)
    if len(pred) > max_points:
        pred = pred[rng.choice(len(pred), max_points, replace=False)]
    if len(gt) > max_points:
        gt = gt[rng.choice(len(gt), max_points, replace=False)]
    to_gt, to_pred = _nearest(pred, gt), _nearest(gt, pred)
    precision, coverage = float((to_gt < tau).mean()), float((to_pred < tau).mean())
    f = 2 * precision * coverage / (precision + coverage) if precision + coverage > 0 else 0.0
    return {"accuracy": float(to_gt.mean()), "completeness": float(to_pred.mean()), "precision": precision,
            "coverage": coverage, "fscore": float(f), "map_points": float(n_pred)}
