"""``streamrecon eval``: run a model over sequences with ground truth and score it, next to baselines.

Per sequence: depth AbsRel and delta<1.25 (per-frame median scaling, and metric), ATE (Sim(3) and
SE(3) Umeyama alignment; RMSE and % of the GT path length), RPE (delta 1 frame), and the map against
the GT cloud of the scored frames (accuracy, completeness, precision / coverage / F-score within
``MAP_TAU``; see :func:`~streamrecon.eval.metrics.map_metrics`), after a Sim(3) fitted on per-pixel
correspondences (predicted and true world point of the same pixel). On sequences with ground-truth
motion masks (synthetic sets with movers) the map is scored against the *static* scene (moving pixels
left out of the ground-truth cloud and of the alignment), the predicted cloud is what the map keeps
(``--dynamic-mask`` pixels left out), ``map_dynamic_fraction`` is the share of it that came from moving
pixels, and the masks get IoU / precision / recall (pixel counts summed over the frames; a frame
without a mask counts as nothing masked).
Baselines: the same architecture untrained (seeded random weights) and constant depth (1 m) with
identity poses.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import numpy as np

from ..dynamic.masks import mask_metrics, ratios
from ..frames import Frame
from ..pipeline.resolve import LoadedModel, resolve_conf_thresh
from ..progress import bar
from .datasets import EvalSequence
from .metrics import MAP_KEYS, MAP_TAU, ate, depth_metrics, map_metrics, rpe, umeyama

__all__ = ["EvalConfig", "evaluate_sequence", "score_results", "constant_baseline", "evaluate", "format_report",
           "gt_depth_at_model"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    size: Optional[int] = None
    policy: str = "cut3r"
    reset_every: int = 0
    max_frames: int = 0
    stride: int = 1
    conf_thresh: Optional[float] = None  # None: the model's recommendation, 1.5 without a model
    map_pixel_stride: int = 4


def gt_depth_at_model(depth: np.ndarray, crop) -> np.ndarray:
    """Ground-truth depth (original pixels) resized (nearest) and cropped like the model input."""
    import cv2

    h1, w1 = crop.resized_hw
    d = cv2.resize(depth, (w1, h1), interpolation=cv2.INTER_NEAREST) if depth.shape != (h1, w1) else depth
    y0, x0 = crop.crop_xy[1], crop.crop_xy[0]
    return d[y0:y0 + crop.output_hw[0], x0:x0 + crop.output_hw[1]]


def _frame_indices(seq: EvalSequence, cfg: EvalConfig) -> list[int]:
    idx = list(range(0, len(seq), max(1, cfg.stride)))
    return idx[: cfg.max_frames] if cfg.max_frames else idx


def _pixels_to_world(u: np.ndarray, v: np.ndarray, z: np.ndarray, K: np.ndarray, T_wc: np.ndarray) -> np.ndarray:
    """Pixels ``(u, v)`` at z-depth ``z`` of a camera with intrinsics ``K`` and pose ``T_wc`` -> world ``(M, 3)``."""
    cam = np.stack([u, v, np.ones_like(z)], 1) @ np.linalg.inv(K).T * z[:, None]
    return cam @ T_wc[:3, :3].T + T_wc[:3, 3]


def _gt_cloud(seq: EvalSequence, idx: list[int], stride: int) -> np.ndarray:
    """The ground-truth cloud of frames ``idx`` (every ``stride``-th pixel; moving pixels left out)."""
    pts = []
    for i in idx:
        d = seq.depth(i)
        moving = seq.dynamic(i)
        if moving is not None:
            d = np.where(moving, 0, d)
        d = d[::stride, ::stride]
        v, u = np.nonzero(d > 0)
        pts.append(_pixels_to_world(u * stride, v * stride, d[v, u], seq.K, seq.T_wc[i]))
    return np.concatenate(pts) if pts else np.zeros((0, 3))


def _summarise(depth_rows: list[dict], pred_T: np.ndarray, gt_T: np.ndarray, pred_cloud: np.ndarray,
               gt_cloud: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> dict:
    out = {k: float(np.nanmean([r[k] for r in depth_rows])) for k in ("abs_rel", "delta1", "abs_rel_metric",
                                                                      "delta1_metric")}
    sim3, se3 = ate(pred_T, gt_T, True), ate(pred_T, gt_T, False)
    out.update(ate_sim3=sim3["rmse"], ate_sim3_pct=sim3["percent_of_path"], sim3_scale=sim3["scale"],
               ate_se3=se3["rmse"], ate_se3_pct=se3["percent_of_path"], path_length=sim3["path_length"])
    r = rpe(pred_T, gt_T, 1, with_scale=True)
    out.update(rpe_trans=r["trans_rmse"], rpe_rot_deg=r["rot_rmse_deg"])
    if len(pred_cloud) and len(pairs[0]) >= 3:
        # Sim(3) fitted on pixel correspondences (predicted vs ground-truth world point of the same pixel):
        # well posed even when the camera centres are not (pure rotations, short or mis-scaled paths)
        s, R, t = umeyama(pairs[0], pairs[1], True)
        aligned = (s * (R @ pred_cloud.T)).T + t
        out.update(map_metrics(aligned, gt_cloud), map_scale=float(s))
    else:
        out.update({k: math.nan for k in MAP_KEYS}, map_points=float(len(pred_cloud)), map_scale=math.nan)
    return out


def _gt_world_at_model(seq: EvalSequence, i: int, r, gt_depth: np.ndarray, stride: int,
                       moving: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(pred, gt)`` world points ``(M, 3)`` of the pixels (every ``stride``-th) with valid ground truth
    (and not on a moving object, given ``moving`` at model resolution)."""
    ok_gt = gt_depth > 0 if moving is None else (gt_depth > 0) & ~moving
    v, u = np.nonzero(ok_gt[::stride, ::stride])
    v, u = v * stride, u * stride
    gt = _pixels_to_world(u, v, gt_depth[v, u], r.crop.K_to_model(seq.K), seq.T_wc[i])
    pred = r.points_world_pose[v, u]
    ok = np.isfinite(pred).all(1)
    return pred[ok], gt[ok]


def score_results(seq: EvalSequence, idx: list[int], results: list, cfg: EvalConfig = EvalConfig()) -> dict:
    """Metrics of already computed :class:`FrameResult` s for frames ``idx`` of ``seq``."""
    depth_rows, cloud, pred_pairs, gt_pairs = [], [], [], []
    counts = np.zeros(3, np.int64)  # mask tp, fp, fn
    from_moving = kept = 0
    thresh = resolve_conf_thresh(None, cfg.conf_thresh)
    for i, r in zip(idx, results):
        if not getattr(r, "network", True):  # --network-every: a tracked-only frame has a pose, no pixels
            continue
        gt = gt_depth_at_model(seq.depth(i), r.crop)
        depth_rows.append(depth_metrics(r.depth, gt, gt > 0))
        masked = getattr(r, "dynamic_mask", None)  # --dynamic-mask: the pixels the map left out
        moving = seq.dynamic(i)
        if moving is not None:
            moving = gt_depth_at_model(moving.astype(np.uint8), r.crop) > 0
            pred = masked if masked is not None else np.zeros_like(moving)
            m = mask_metrics(pred, moving, gt > 0)
            counts += (m["tp"], m["fp"], m["fn"])
        s = cfg.map_pixel_stride
        pts = r.points_world_pose[::s, ::s].reshape(-1, 3)
        conf = r.conf_cam if masked is None else np.where(masked, -np.inf, r.conf_cam)  # what the map keeps
        conf = conf[::s, ::s].reshape(-1)
        keep = (conf > thresh) & np.isfinite(pts).all(1)
        cloud.append(pts[keep])
        if moving is not None:
            from_moving += int((keep & moving[::s, ::s].reshape(-1)).sum())
            kept += int(keep.sum())
        p, g = _gt_world_at_model(seq, i, r, gt, 2 * s, moving)
        pred_pairs.append(p)
        gt_pairs.append(g)
    out = _summarise(depth_rows, np.stack([r.T_wc for r in results]), seq.T_wc[idx], np.concatenate(cloud),
                     _gt_cloud(seq, idx, cfg.map_pixel_stride), (np.concatenate(pred_pairs), np.concatenate(gt_pairs)))
    out.update(name=seq.name, frames=len(idx))
    masks = [getattr(r, "dynamic_mask", None) for r in results]
    if any(m is not None for m in masks):  # on a static scene: the false-positive rate
        out["masked_fraction"] = float(np.mean([0.0 if m is None else m.mean() for m in masks]))
    if seq.dynamic_loader is not None:
        out.update({f"mask_{k}": v for k, v in ratios(*counts.tolist()).items()},
                   mask_tp=int(counts[0]), mask_fp=int(counts[1]), mask_fn=int(counts[2]),
                   map_dynamic_fraction=from_moving / kept if kept else math.nan)
    return out


def evaluate_sequence(model, seq: EvalSequence, cfg: EvalConfig = EvalConfig(),
                      on_frame: Optional[Callable[[], None]] = None) -> dict:
    """Stream the sequence through a fresh :class:`StreamEngine` and score it (``model``: a model or a
    :class:`LoadedModel`, whose checkpoint's recommended threshold is used unless ``cfg`` gives one)."""
    from ..engine import EngineConfig, StreamEngine, default_size

    loaded = LoadedModel.wrap(model)
    model = loaded.model

    engine = StreamEngine(model, EngineConfig(size=cfg.size or default_size(model), policy=cfg.policy,
                                              reset_every=cfg.reset_every))
    idx = _frame_indices(seq, cfg)
    t0 = time.perf_counter()
    results = []
    for i in idx:
        results.append(engine.process(Frame(image=seq.rgb(i), seq=i, stamp=float(seq.stamps[i]), source=seq.name)))
        if on_frame is not None:
            on_frame()
    fps = len(idx) / (time.perf_counter() - t0)
    scored = score_results(seq, idx, results, replace(cfg, conf_thresh=resolve_conf_thresh(loaded.info, cfg.conf_thresh)))
    return scored | {"fps": fps}


def constant_baseline(seq: EvalSequence, cfg: EvalConfig = EvalConfig(), idx: Optional[list[int]] = None) -> dict:
    """Constant 1 m depth everywhere and the identity pose for every frame (``idx``: these frames,
    else those ``cfg`` picks)."""
    idx = idx if idx is not None else _frame_indices(seq, cfg)
    rows = [depth_metrics(np.ones_like(d := seq.depth(i)), d, d > 0) for i in idx]
    T = np.tile(np.eye(4), (len(idx), 1, 1))
    h, w = seq.depth(idx[0]).shape
    v, u = np.mgrid[0:h:8, 0:w:8]
    u, v = u.ravel(), v.ravel()
    plane = _pixels_to_world(u, v, np.ones(u.size), seq.K, np.eye(4))
    pred_pairs, gt_pairs = [], []
    for i in idx:  # the same pixels with their ground-truth world points
        z = seq.depth(i)[v, u]
        ok = z > 0
        pred_pairs.append(plane[ok])
        gt_pairs.append(_pixels_to_world(u[ok], v[ok], z[ok], seq.K, seq.T_wc[i]))
    out = _summarise(rows, T, seq.T_wc[idx], plane, _gt_cloud(seq, idx, cfg.map_pixel_stride),
                     (np.concatenate(pred_pairs), np.concatenate(gt_pairs)))
    out.update(name=seq.name, frames=len(idx))
    return out


_KEYS = ("abs_rel", "delta1", "abs_rel_metric", "delta1_metric", "ate_sim3", "ate_sim3_pct", "ate_se3", "rpe_trans",
         "rpe_rot_deg", "accuracy", "completeness", "coverage", "fscore", "map_points")


def _mean(rows: list[dict]) -> dict:
    return {k: float(np.nanmean([r[k] for r in rows])) for k in _KEYS if rows}


def evaluate(model, sequences: list[EvalSequence], cfg: EvalConfig = EvalConfig(), baselines: bool = True,
             untrained_seed: int = 0, progress: Optional[bool] = None) -> dict:
    """Score ``model`` on every sequence; with ``baselines``, also the untrained twin and the constant baseline.

    The map-accuracy filter uses ``cfg.conf_thresh`` or else the model's recommended threshold, for the
    model and its untrained twin alike.
    """
    loaded = LoadedModel.wrap(model)
    model = loaded.model
    cfg = replace(cfg, conf_thresh=resolve_conf_thresh(loaded.info, cfg.conf_thresh))
    total = sum(len(_frame_indices(s, cfg)) for s in sequences) * (2 if baselines else 1)
    with bar(total, "eval", enabled=progress) as b:
        b.set_description("eval model")
        rows = [evaluate_sequence(model, s, cfg, on_frame=lambda: b.update(1)) for s in sequences]
        report = {"model": {"mean": _mean(rows), "sequences": rows}, "config": asdict(cfg),
                  "n_sequences": len(sequences)}
        if baselines:
            import torch

            from ..models import Cut3r

            torch.manual_seed(untrained_seed)
            untrained = Cut3r(model.cfg).to(model.device).eval()
            b.set_description("eval untrained baseline")
            u_rows = [evaluate_sequence(untrained, s, cfg, on_frame=lambda: b.update(1)) for s in sequences]
    if baselines:
        c_rows = [constant_baseline(s, cfg) for s in sequences]
        report["untrained"] = {"mean": _mean(u_rows), "sequences": u_rows}
        report["constant"] = {"mean": _mean(c_rows), "sequences": c_rows}
    return report


def format_report(report: dict) -> str:
    """A small table: rows = model / baselines, columns = the main metrics."""
    cols = [("abs_rel", "AbsRel"), ("delta1", "d<1.25"), ("abs_rel_metric", "AbsRel(m)"), ("delta1_metric", "d<1.25(m)"),
            ("ate_sim3_pct", "ATE Sim3 %"), ("ate_sim3", "ATE Sim3 m"), ("ate_se3", "ATE SE3 m"),
            ("rpe_rot_deg", "RPE deg"), ("accuracy", "acc m"), ("completeness", "comp m"),
            ("coverage", f"cov@{MAP_TAU * 100:.0f}cm"), ("fscore", f"F@{MAP_TAU * 100:.0f}cm"), ("map_points", "points")]
    head = f"{'':<11}" + "".join(f"{name:>11}" for _, name in cols)
    lines = [f"{report['n_sequences']} sequences", head]
    for row in ("model", "untrained", "constant"):
        if row in report:
            m = report[row]["mean"]
            lines.append(f"{row:<11}" + "".join(f"{m.get(k, math.nan):>11.{0 if k == 'map_points' else 4}f}"
                                                for k, _ in cols))
    return "\n".join(lines)
