#!/usr/bin/env python3
"""A picture of a model's depth on real frames: input | prediction per model | ground truth, one row per frame.

Example:
    python tools/depth_figure.py docs/images/bundled_depth.jpg --weights "" --weights outputs/train_small_v2/best.safetensors \\
        --frame ../shared/data/sun3d_studyroom:0 --frame ../shared/data/sun3d_studyroom:60 \\
        --frame ../shared/data/apc_shelf_scene0000:5

Each prediction is median-scaled to the ground truth of its frame and drawn with the same colour scale
as the ground truth (turbo, near = red); black where the ground truth has no depth. ``--weights ""`` is the
bundled model. Each frame is run as the first frame of a fresh stream (no state from earlier frames).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np


def _colour(d: np.ndarray, lo: float, hi: float, valid: np.ndarray) -> np.ndarray:
    x = np.clip((d - lo) / max(hi - lo, 1e-6), 0, 1)
    c = cv2.applyColorMap((255 * (1 - x)).astype(np.uint8), cv2.COLORMAP_TURBO)
    c[~valid] = 0
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--weights", action="append", default=[], help="checkpoint ('' = bundled); repeat for columns")
    ap.add_argument("--frame", action="append", required=True, help="DATASET_DIR:INDEX")
    ap.add_argument("--height", type=int, default=168, help="row height in pixels")
    args = ap.parse_args()

    from streamrecon.checkpoint import load_model
    from streamrecon.engine import EngineConfig, Frame, StreamEngine, default_size
    from streamrecon.eval.datasets import find_sequences
    from streamrecon.eval.evaluate import gt_depth_at_model
    from streamrecon.pipeline.resolve import resolve_weights

    models = [load_model(resolve_weights(w or None)[0]) for w in (args.weights or [""])]
    rows = []
    for spec in args.frame:
        d, i = spec.rsplit(":", 1)
        seq = find_sequences(d)[0]
        i = int(i)
        cells, gt_m = [], None
        for m in models:
            r = StreamEngine(m, EngineConfig(size=default_size(m))).process(
                Frame(image=seq.rgb(i), seq=i, stamp=float(seq.stamps[i])))
            gt = gt_depth_at_model(seq.depth(i), r.crop)
            valid = gt > 0
            lo, hi = np.percentile(gt[valid], [2, 98])
            pred = r.depth * (np.median(gt[valid]) / np.median(r.depth[valid]))
            if gt_m is None:
                gt_m = (gt, valid, lo, hi, r.colors)
            cells.append(_colour(pred, lo, hi, np.ones_like(valid)))
        gt, valid, lo, hi, rgb = gt_m
        row = [cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)] + cells + [_colour(gt, lo, hi, valid)]
        h = args.height
        rows.append(np.concatenate([cv2.resize(c, (int(round(c.shape[1] * h / c.shape[0])), h),
                                               interpolation=cv2.INTER_NEAREST) for c in row], 1))
    w = max(r.shape[1] for r in rows)
    img = np.concatenate([np.pad(r, ((0, 4), (0, w - r.shape[1]), (0, 0))) for r in rows], 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, img, [cv2.IMWRITE_JPEG_QUALITY, 88])
    print(f"wrote {args.out}: {len(rows)} frames x ({len(models)} models + input + ground truth)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
