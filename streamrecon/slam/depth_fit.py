"""The network's depth bent to the tracked geometry (``--depth-fit grid``).

The tracker triangulates landmarks from several views; in a tracked frame each of them gives the
true depth (in the map's units) at one pixel. ``--depth-fit scale`` multiplies the whole network depth
map by one number, the median ratio between those depths and the network's at the same pixels. With a
weak network (the bundled model on real video draws much the same depth layout for every frame) that
keeps its wrong layout. ``--depth-fit grid`` instead fits a smooth **multiplicative correction field**
to the same ratios:

    depth_fitted(u, v) = depth_net(u, v) * exp(g(u, v))

where ``g`` is bilinear on a coarse grid of nodes (``cells`` across the width, 11 x 8 nodes for a 4:3
map at any resolution), found by robust least squares (Huber, iteratively reweighted) of
``g(p_i) = log(z_i / depth_net(p_i))`` over the landmarks, with a smoothness term (neighbouring nodes
alike) and a weak pull of every node towards the global median ratio, so nodes without landmarks
near them fall back to ``--depth-fit scale``'s answer. The network still gives the detail (edges,
anything between the landmarks); the tracked geometry gives the layout.

The field is only used where the landmarks support it: with fewer than ``min_per_node`` landmarks
per node the frame gets the scale alone, and a ``folds``-fold cross-validation over the landmarks
picks the smoothness and keeps the scale alone unless the field predicts held-out landmarks at least
``min_gain`` better (landmarks that are consistent only with one depth ratio bend nothing). A fit
costs 1-3 ms for 150-600 landmarks (the node count does not grow with the map's resolution).

The landmarks are only as good as the tracking: where it fails (measured on the APC robot-arm views,
12 degrees between frames, ~30 landmarks a frame, their depths off by 36 % after a median scale) the
field would copy their errors; the landmark-count gate keeps those frames at the scale alone.

Pixels are model pixels, ``(u, v)`` = (column, row); depth is camera-frame ``z``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["DepthFitConfig", "DepthFit", "fit_depth", "sample_depth"]


@dataclass(frozen=True)
class DepthFitConfig:
    cells: int = 10  # grid cells across the width (rows in proportion; >= 1 cell each way)
    smooth: tuple = (0.1, 0.3, 1.0, 3.0, 10.0)  # candidate weights of (g_a - g_b)^2 between neighbouring nodes
    pull: float = 0.01  # weight of (g - median log ratio)^2 per node
    huber: float = 1.5  # Huber threshold in robust standard deviations (MAD) of the residuals
    iterations: int = 3  # reweighting passes
    folds: int = 4  # cross-validation folds that choose the smoothness (or the scale alone)
    min_gain: float = 0.05  # the field must predict held-out landmarks this much better than the scale alone
    min_per_node: float = 1.5  # fewer usable landmarks than this many per grid node: the median ratio only

    def __post_init__(self) -> None:
        if self.cells < 1 or self.folds < 2 or self.min_per_node <= 0 or not self.smooth:
            raise ValueError(f"bad DepthFitConfig: {self}")
        if min(self.smooth) < 0 or self.pull <= 0 or self.huber <= 0 or not 0 <= self.min_gain < 1:
            raise ValueError(f"DepthFitConfig weights must be positive: {self}")


@dataclass(frozen=True)
class DepthFit:
    """A fitted frame. ``depth`` (H, W) float32 is the corrected depth; ``scale`` the global median
    ratio; ``points`` how many landmarks were used; ``smooth`` the smoothness cross-validation chose
    (None: the scale alone won, or too few landmarks); ``residual`` the median |log ratio| left at the
    landmarks after the fit (before, with the scale alone: ``residual0``); ``held_out`` the median
    held-out |log ratio| of the scale alone and of the chosen fit (NaN when not cross-validated)."""

    depth: np.ndarray
    scale: float
    points: int
    smooth: Optional[float]
    residual: float
    residual0: float
    held_out: tuple = (float("nan"), float("nan"))

    @property
    def grid(self) -> bool:
        return self.smooth is not None


def _interp_matrix(coords: np.ndarray, n_nodes: int, length: int) -> np.ndarray:
    """(len(coords), n_nodes) linear-interpolation weights of positions in [0, length - 1] onto
    ``n_nodes`` equally spaced nodes spanning the same range."""
    t = np.clip(np.asarray(coords, np.float64), 0.0, length - 1.0) / max(length - 1.0, 1e-9) * (n_nodes - 1)
    i0 = np.clip(np.floor(t).astype(int), 0, n_nodes - 2)
    a = t - i0
    M = np.zeros((len(t), n_nodes))
    rows = np.arange(len(t))
    M[rows, i0] = 1.0 - a
    M[rows, i0 + 1] = a
    return M


def sample_depth(depth: np.ndarray, px: np.ndarray) -> np.ndarray:
    """``depth`` (H, W) at pixels ``px`` (N, 2, (u, v)), nearest pixel; NaN outside the image."""
    h, w = depth.shape
    u = np.rint(px[:, 0]).astype(int)
    v = np.rint(px[:, 1]).astype(int)
    z = np.full(len(px), np.nan)
    ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    z[ok] = depth[v[ok], u[ok]]
    return z


def fit_depth(depth: np.ndarray, px: np.ndarray, z: np.ndarray, cfg: Optional[DepthFitConfig] = None,
              fallback_scale: Optional[float] = None) -> DepthFit:
    """Fit ``depth`` (H, W, the network's, model pixels) to landmark depths ``z`` (N,) at model pixels
    ``px`` (N, 2, (u, v)). Landmarks outside the image, at invalid depth or not in front of the camera
    are ignored. With fewer than ``cfg.min_per_node`` usable ones per grid node, or when the field does not
    predict held-out landmarks ``cfg.min_gain`` better, the depth is multiplied by the median
    ratio (or ``fallback_scale`` when there are none at all, else 1)."""
    cfg = cfg if cfg is not None else DepthFitConfig()
    depth = np.asarray(depth, np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {depth.shape}")
    px = np.asarray(px, np.float64).reshape(-1, 2)
    z = np.asarray(z, np.float64).reshape(-1)
    if len(px) != len(z):
        raise ValueError(f"{len(px)} pixels but {len(z)} depths")
    h, w = depth.shape
    zn = sample_depth(depth, px)
    ok = np.isfinite(z) & (z > 0) & np.isfinite(zn) & (zn > 0)
    r = np.log(z[ok] / zn[ok])
    p = px[ok]
    if len(r) == 0:
        s = float(fallback_scale) if fallback_scale else 1.0
        return DepthFit(depth * np.float32(s), s, 0, None, float("nan"), float("nan"))
    m = float(np.median(r))
    res0 = float(np.median(np.abs(r - m)))
    gx = cfg.cells + 1
    gy = max(1, int(round(cfg.cells * (h - 1) / max(w - 1, 1)))) + 1
    if len(r) < max(2 * cfg.folds, cfg.min_per_node * gx * gy):
        return DepthFit(depth * np.float32(np.exp(m)), float(np.exp(m)), len(r), None, res0, res0)
    Ax, Ay = _interp_matrix(p[:, 0], gx, w), _interp_matrix(p[:, 1], gy, h)
    A = (Ay[:, :, None] * Ax[:, None, :]).reshape(len(r), gy * gx)  # node (j, i) at j * gx + i
    idx = np.arange(gy * gx).reshape(gy, gx)
    pairs = np.concatenate([np.stack([idx[:, :-1].ravel(), idx[:, 1:].ravel()], 1),
                            np.stack([idx[:-1, :].ravel(), idx[1:, :].ravel()], 1)])
    D = np.zeros((len(pairs), gy * gx))
    D[np.arange(len(pairs)), pairs[:, 0]] = 1.0
    D[np.arange(len(pairs)), pairs[:, 1]] = -1.0
    DtD = D.T @ D

    # cross-validation: each candidate smoothness (and the scale alone) predicts held-out landmarks
    fold = np.arange(len(r)) % cfg.folds  # landmarks come in tracker order: interleave, not blocks
    # (plain least squares here, one normal matrix per fold for every candidate; the median scores it)
    held = np.zeros((len(cfg.smooth) + 1, len(r)))
    eye = cfg.pull * np.eye(gy * gx)
    for k in range(cfg.folds):
        tr, te = fold != k, fold == k
        mk = float(np.median(r[tr]))
        held[0, te] = np.abs(r[te] - mk)
        N, b = A[tr].T @ A[tr] + eye, A[tr].T @ r[tr] + cfg.pull * mk
        for c, lam in enumerate(cfg.smooth):
            held[c + 1, te] = np.abs(A[te] @ np.linalg.solve(N + lam * DtD, b) - r[te])
    scores = np.median(held, axis=1)
    best = 1 + int(np.argmin(scores[1:]))
    if scores[best] > (1.0 - cfg.min_gain) * scores[0]:
        return DepthFit(depth * np.float32(np.exp(m)), float(np.exp(m)), len(r), None, res0, res0,
                        (float(scores[0]), float(scores[0])))
    lam = float(cfg.smooth[best - 1])
    g = _solve(A, r, lam * DtD, m, cfg)
    res = float(np.median(np.abs(A @ g - r)))
    field = _interp_matrix(np.arange(h), gy, h) @ g.reshape(gy, gx) @ _interp_matrix(np.arange(w), gx, w).T
    return DepthFit((depth * np.exp(field)).astype(np.float32), float(np.exp(m)), len(r), lam, res, res0,
                    (float(scores[0]), float(scores[best])))


def _solve(A: np.ndarray, r: np.ndarray, smooth: np.ndarray, m: float, cfg: DepthFitConfig) -> np.ndarray:
    """Node values ``g`` minimising sum_i rho(A_i g - r_i) + g^T smooth g + pull |g - m|^2 (Huber rho,
    by iteratively reweighted least squares)."""
    reg = smooth + cfg.pull * np.eye(A.shape[1])
    wts = np.ones(len(r))
    g = np.full(A.shape[1], m)
    for _ in range(max(1, cfg.iterations)):
        Aw = A * wts[:, None]
        g = np.linalg.solve(A.T @ Aw + reg, Aw.T @ r + cfg.pull * m)
        e = np.abs(A @ g - r)
        delta = cfg.huber * max(1.4826 * float(np.median(e)), 0.02)
        wts = np.where(e <= delta, 1.0, delta / np.maximum(e, 1e-12))
    return g
