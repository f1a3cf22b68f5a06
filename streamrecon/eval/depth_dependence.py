"""Does a model's depth depend on the image? Scores against a constant and against the model's own average.

A network that learned only a prior (far in the centre, near at the borders) can beat a constant depth
map by a little while ignoring the image. Three numbers tell it apart, each over the same valid pixels:

- ``abs_rel`` of the per-frame prediction (median-scaled), beside ``abs_rel_constant`` (a constant map,
  median-scaled: the median of the ground truth everywhere) and ``abs_rel_mean_map`` (the model's own
  average prediction over the frames of the set, median-scaled per frame: the best image-independent map
  the model itself offers). An image-conditioned model beats both; a prior beats neither, or only the
  constant. ``abs_rel_gt_mean`` scores the average of the (median-normalised) ground truth itself: the
  best image-independent map in hindsight; where it is low, the frames are too alike to tell.
  ``gain_vs_constant`` = ``1 - abs_rel / abs_rel_constant`` (issue 15's target: >= 0.25).
- ``corr`` / ``corr_mean_map``: per-frame Pearson correlation of log depth with log ground truth, for
  the prediction and for the average map (structure that follows the scene, not the image position).
- ``dependence``: mean relative deviation of each (median-normalised) prediction from the average map:
  0 for a model that predicts the same map for every image.

Frames are grouped by model-resolution shape (one average map per shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

__all__ = ["DepthFrame", "dependence_scores", "collect_frames"]


@dataclass(frozen=True)
class DepthFrame:
    """One frame's predicted and ground-truth depth at model resolution.

    Attributes:
        pred: ``(H, W)`` float predicted z-depth (any scale).
        gt: ``(H, W)`` float ground-truth metres, 0 where invalid.
    """

    pred: np.ndarray
    gt: np.ndarray


def _norm(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    return d / float(np.median(d[m]))


def _abs_rel(p: np.ndarray, g: np.ndarray) -> float:
    s = np.median(g) / np.median(p)
    return float(np.mean(np.abs(p * s - g) / g))


def _corr(p: np.ndarray, g: np.ndarray) -> float:
    lp, lg = np.log(p), np.log(g)
    if lp.std() < 1e-12 or lg.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(lp, lg)[0, 1])


def dependence_scores(frames: Iterable[DepthFrame], min_pixels: int = 100) -> dict:
    """The scores of the module docstring over ``frames`` (means over frames; NaN without any)."""
    frames = list(frames)
    valid = [(f, (f.gt > 0) & np.isfinite(f.pred) & (f.pred > 0)) for f in frames]
    valid = [(f, m) for f, m in valid if m.sum() >= min_pixels]
    rows: dict[str, list] = {k: [] for k in ("abs_rel", "abs_rel_constant", "abs_rel_mean_map", "abs_rel_gt_mean",
                                             "corr", "corr_mean_map", "dependence")}
    by_shape: dict[tuple, list] = {}
    for f, m in valid:
        by_shape.setdefault(f.pred.shape, []).append((f, m))
    for group in by_shape.values():
        # the model's own average (median-normalised per frame, so scale changes do not count)
        shape = group[0][0].pred.shape
        acc, cnt, gacc, gcnt = np.zeros(shape), np.zeros(shape), np.zeros(shape), np.zeros(shape)
        for f, m in group:
            pm = (f.pred > 0) & np.isfinite(f.pred)
            acc[pm] += _norm(f.pred, pm)[pm]
            cnt[pm] += 1
            gacc[m] += _norm(f.gt, m)[m]
            gcnt[m] += 1
        mean_map = np.where(cnt > 0, acc / np.maximum(cnt, 1), np.nan)
        gt_mean = np.where(gcnt > 0, gacc / np.maximum(gcnt, 1), np.nan)
        for f, m in group:
            mm = m & np.isfinite(mean_map) & (mean_map > 0) & np.isfinite(gt_mean)
            p, g, a = f.pred[mm].astype(np.float64), f.gt[mm].astype(np.float64), mean_map[mm]
            rows["abs_rel_gt_mean"].append(_abs_rel(gt_mean[mm], g))
            rows["abs_rel"].append(_abs_rel(p, g))
            rows["abs_rel_constant"].append(float(np.mean(np.abs(np.median(g) - g) / g)))
            rows["abs_rel_mean_map"].append(_abs_rel(a, g))
            rows["corr"].append(_corr(p, g))
            rows["corr_mean_map"].append(_corr(a, g))
            rows["dependence"].append(float(np.mean(np.abs(p / np.median(p) - a / np.median(a)) / (a / np.median(a)))))
    out = {k: float(np.mean(v)) if v else math.nan for k, v in rows.items()}
    out["gain_vs_constant"] = 1 - out["abs_rel"] / out["abs_rel_constant"] if out["abs_rel_constant"] else math.nan
    out["frames"] = sum(len(g) for g in by_shape.values())
    return out


def collect_frames(model, sequences, size: Optional[int] = None, max_frames: int = 0, stride: int = 1) -> list[DepthFrame]:
    """Stream each :class:`~streamrecon.eval.datasets.EvalSequence` through a fresh engine (state carried,
    as ``streamrecon eval`` does) and keep every frame's predicted and ground-truth depth."""
    from ..engine import EngineConfig, StreamEngine, default_size
    from ..frames import Frame
    from ..pipeline.resolve import LoadedModel
    from .evaluate import gt_depth_at_model

    loaded = LoadedModel.wrap(model)
    out = []
    for seq in sequences:
        engine = StreamEngine(loaded.model, EngineConfig(size=size or default_size(loaded.model)))
        idx = list(range(0, len(seq), max(1, stride)))
        for i in idx[:max_frames] if max_frames else idx:
            r = engine.process(Frame(image=seq.rgb(i), seq=i, stamp=float(seq.stamps[i]), source=seq.name))
            out.append(DepthFrame(pred=np.asarray(r.depth, np.float64), gt=gt_depth_at_model(seq.depth(i), r.crop)))
    return out
