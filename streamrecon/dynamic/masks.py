"""From a per-pixel dynamic score to a mask, and how a mask is scored against the ground truth.

A score is ``(H, W)`` float32 in ``[0, 1]`` (model resolution); the mask is ``score > thresh``, opened
(isolated pixels dropped) and then dilated by ``grow`` pixels, so the blurred border of a mover stays
out of the map too.
"""

from __future__ import annotations

import numpy as np

__all__ = ["score_to_mask", "mask_metrics", "ratios", "otsu_threshold"]


def score_to_mask(score: np.ndarray, thresh: float = 0.5, grow: int = 1) -> np.ndarray:
    """``(H, W)`` bool: ``score > thresh``, morphologically opened (3x3), then dilated by ``grow`` px."""
    import cv2

    m = (np.nan_to_num(score, nan=0.0) > thresh).astype(np.uint8)
    if not m.any():
        return m.astype(bool)
    k3 = np.ones((3, 3), np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k3)
    if grow > 0:
        m = cv2.dilate(m, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
    return m.astype(bool)


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of ``values`` in ``[0, 1]`` (the split that maximises the between-class variance)."""
    v = np.clip(values[np.isfinite(values)], 0.0, 1.0)
    if v.size == 0:
        return 0.5
    hist, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def mask_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
    """Pixel counts and ratios of a predicted mask against the ground truth (both ``(H, W)`` bool).

    Returns ``tp``, ``fp``, ``fn`` (counts over ``valid``) and ``iou``, ``precision``, ``recall`` (NaN
    where undefined: no positive predicted / in the ground truth). Sum the counts over frames before
    taking ratios (:func:`ratios`) for a sequence's figure.
    """
    if valid is None:
        valid = np.ones(gt.shape, bool)
    p, g = pred & valid, gt & valid
    tp, fp, fn = int((p & g).sum()), int((p & ~g).sum()), int((~p & g).sum())
    return {"tp": tp, "fp": fp, "fn": fn, **ratios(tp, fp, fn)}


def ratios(tp: int, fp: int, fn: int) -> dict[str, float]:
    """IoU, precision and recall of pixel counts (NaN where a denominator is 0)."""
    nan = float("nan")
    return {"iou": tp / (tp + fp + fn) if tp + fp + fn else nan, "precision": tp / (tp + fp) if tp + fp else nan,
            "recall": tp / (tp + fn) if tp + fn else nan}
