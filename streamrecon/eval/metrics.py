"""Accuracy metrics: depth, trajectory (ATE/RPE with Sim(3)/SE(3) alignment), map.

All numpy. ``T`` arrays are ``(N, 4, 4)`` camera-to-world.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["depth_metrics", "umeyama", "ate", "rpe", "path_length", "map_metrics", "associate"]


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


def _align(pred: np.ndarray, gt: np.ndarray, with_scale: bool) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    s, R, t = umeyama(pred[:, :3, 3], gt[:, :3, 3], with_scale)
    out = pred.copy()
    out[:, :3, :3] = R @ pred[:, :3, :3]
    out[:, :3, 3] = (s * (R @ pred[:, :3, 3].T)).T + t
    return out, s, R, t


def ate(pred: np.ndarray, gt: np.ndarray, with_scale: bool) -> dict[str, float]:
    """Absolute trajectory error: RMSE of camera centres after Umeyama alignment (Sim(3) or SE(3))."""
    aligned, s, _, _ = _align(pred, gt, with_scale)
    err = np.linalg.norm(aligned[:, :3, 3] - gt[:, :3, 3], axis=1)
    length = path_length(gt)
    rmse = float(np.sqrt(np.mean(err ** 2)))
    return {"rmse": rmse, "scale": s, "path_length": length,
            "percent_of_path": 100.0 * rmse / length if length > 1e-9 else math.nan}


def rpe(pred: np.ndarray, gt: np.ndarray, delta: int = 1, with_scale: bool = False) -> dict[str, float]:
    """Relative pose error over ``delta`` frames: translation RMSE (after the Sim(3) scale when asked)
    and rotation RMSE in degrees."""
    s = _align(pred, gt, True)[1] if with_scale else 1.0
    te, re = [], []
    for i in range(len(gt) - delta):
        dp = np.linalg.inv(pred[i]) @ pred[i + delta]
        dg = np.linalg.inv(gt[i]) @ gt[i + delta]
        dp[:3, 3] *= s
        e = np.linalg.inv(dg) @ dp
        te.append(np.linalg.norm(e[:3, 3]))
        re.append(math.degrees(math.acos(np.clip((np.trace(e[:3, :3]) - 1) / 2, -1, 1))))
    if not te:
        return {"trans_rmse": math.nan, "rot_rmse_deg": math.nan}
    return {"trans_rmse": float(np.sqrt(np.mean(np.square(te)))), "rot_rmse_deg": float(np.sqrt(np.mean(np.square(re))))}


def _nearest(a: np.ndarray, b: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Distance from each point of ``a`` to its nearest neighbour in ``b`` (brute force in float64, chunked)."""
    import torch

    tb = torch.from_numpy(b.astype(np.float64))
    out = []
    for i in range(0, len(a), chunk):
        d = torch.cdist(torch.from_numpy(a[i:i + chunk].astype(np.float64)), tb)
        out.append(d.min(1).values.numpy())
    return np.concatenate(out) if out else np.zeros(0)


def map_metrics(pred: np.ndarray, gt: np.ndarray, max_points: int = 20000, seed: int = 0) -> dict[str, float]:
    """Accuracy (mean distance pred -> GT) and completeness (GT -> pred) of two world point clouds."""
    if len(pred) == 0 or len(gt) == 0:
        return {"accuracy": math.nan, "completeness": math.nan}
    rng = np.random.default_rng(seed)
    if len(pred) > max_points:
        pred = pred[rng.choice(len(pred), max_points, replace=False)]
    if len(gt) > max_points:
        gt = gt[rng.choice(len(gt), max_points, replace=False)]
    return {"accuracy": float(_nearest(pred, gt).mean()), "completeness": float(_nearest(gt, pred).mean())}
