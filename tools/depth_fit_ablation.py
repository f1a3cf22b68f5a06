"""What ``--depth-fit grid`` owes to the network and what to the landmarks.

Scores on RGB-D sequences (SUN3D / APC layouts, see ``streamrecon eval``), tracking with the
dataset's intrinsics, three ways of making each frame's depth:

* ``scale``: the network's depth times one factor (the median landmark ratio);
* ``grid``: the network's depth bent to the landmarks (the default);
* ``flat + grid``: the network's depth replaced by its own median before the same fit, so any gain
  over ``grid`` is the landmarks alone and the gap to it is what the network adds;

beside the constant-depth baseline (median-scaled AbsRel on the same pixels). Prints one markdown
table. Poses are the same in every row (the fit never moves a pose).

    python tools/depth_fit_ablation.py ../shared/data/sun3d_studyroom ../shared/data/apc_shelf_scene0000
    python tools/depth_fit_ablation.py ../shared/data/sun3d_studyroom/fragment-2-rgbd-frames \
        --figure docs/images/depth_fit.jpg
"""

from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager

import numpy as np

KEYS = (("abs_rel", "AbsRel", 3), ("delta1", "d<1.25", 3), ("accuracy", "map acc m", 3),
        ("completeness", "map comp m", 3), ("fscore", "F@5cm", 3))


@contextmanager
def _flat_network_depth():
    """While active, ``fit_depth`` sees a constant map (the network's own median) instead of its depth."""
    import streamrecon.slam.depth_fit as df

    real = df.fit_depth

    def flat(depth, px, z, cfg=None, fallback_scale=None):
        return real(np.full_like(depth, np.median(depth)), px, z, cfg, fallback_scale)

    df.fit_depth = flat
    try:
        yield
    finally:
        df.fit_depth = real


def _figure(loaded, seq, frame: int, max_frames: int, out: str) -> None:
    """Image | depth x scale | depth x grid | ground truth of one frame, each median-scaled to the
    ground truth and drawn on one colour scale (near = warm), the AbsRel of the frame written on it."""
    import cv2

    from streamrecon.eval.evaluate import gt_depth_at_model
    from streamrecon.eval.real import _indices, _run_backend

    idx = _indices(len(seq), max_frames, 1)
    frame = min(frame, len(idx) - 1)
    runs = {fit: _run_backend(loaded, seq, idx, f"track+depth-fit={fit}", True, None, "cut3r", 0)[1][frame]
            for fit in ("scale", "grid")}
    r = runs["grid"]
    gt = gt_depth_at_model(seq.depth(idx[frame]), r.crop).astype(np.float64)
    valid = gt > 0
    h, w = gt.shape
    rgb = cv2.resize(seq.rgb(idx[frame]), tuple(int(v) for v in r.crop.resized_hw[::-1]), interpolation=cv2.INTER_AREA)
    x0, y0 = r.crop.crop_xy
    panels = [cv2.cvtColor(rgb[y0:y0 + h, x0:x0 + w], cv2.COLOR_RGB2BGR)]
    lo, hi = np.percentile(gt[valid], [2, 98])
    labels = ["image"]
    for name, d in (("scale", runs["scale"].depth), ("grid", r.depth), ("ground truth", gt)):
        d = d.astype(np.float64)
        if name != "ground truth":
            d = d * np.median(gt[valid] / d[valid])
            labels.append(f"{name}: AbsRel {np.mean(np.abs(d[valid] - gt[valid]) / gt[valid]):.3f}")
        else:
            labels.append(name)
        u8 = np.clip(255 * (hi - d) / max(hi - lo, 1e-9), 0, 255).astype(np.uint8)
        c = cv2.applyColorMap(u8, cv2.COLORMAP_TURBO)
        if name == "ground truth":
            c[~valid] = 0
        panels.append(c)
    k = 3  # enlarge: the bundled model's maps are 160 x 112
    tiles = []
    for p, text in zip(panels, labels):
        p = cv2.resize(p, (w * k, h * k), interpolation=cv2.INTER_NEAREST)
        cv2.putText(p, text, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2, cv2.LINE_AA)
        tiles.append(p)
    cv2.imwrite(out, np.hstack(tiles), [cv2.IMWRITE_JPEG_QUALITY, 88])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--weights", default=None, help="default: the bundled model")
    ap.add_argument("--max-frames", type=int, default=0)
    ap.add_argument("--figure", default=None, metavar="JPG",
                    help="also draw one frame of the first sequence: image, scale, grid, ground truth")
    ap.add_argument("--figure-frame", type=int, default=30, help="which frame (index into the scored frames)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from streamrecon.eval.datasets import find_sequences
    from streamrecon.eval.real import evaluate_backends
    from streamrecon.pipeline import load_resolved
    from streamrecon.settings import EngineSettings
    from streamrecon.weights import bundled_weights

    loaded = load_resolved(EngineSettings(weights=args.weights or str(bundled_weights()), device="cpu"))
    if args.figure:
        seq = next(q for p in args.datasets for q in find_sequences(p) if q.has_depth)
        _figure(loaded, seq, args.figure_frame, args.max_frames, args.figure)
    lines = ["| sequence | depth | " + " | ".join(h for _, h, _ in KEYS) + " |",
             "|---|---|" + "---:|" * len(KEYS)]
    for path in args.datasets:
        for seq in find_sequences(path):
            if not seq.has_depth:
                continue
            rep = evaluate_backends(loaded, [seq], backends=("track+depth-fit=scale", "track+depth-fit=grid"),
                                    max_frames=args.max_frames)
            with _flat_network_depth():
                flat = evaluate_backends(loaded, [seq], backends=("track+depth-fit=grid",), baselines=False,
                                         max_frames=args.max_frames)
            rows = {r["label"]: r for r in rep["sequences"][0]["rows"]}
            named = [("scale", rows["track+depth-fit=scale"]), ("grid", rows["track+depth-fit=grid"]),
                     ("flat + grid", flat["sequences"][0]["rows"][0]), ("constant depth", rows["constant depth"])]
            for name, r in named:
                lines.append(f"| {seq.name} | {name} | " + " | ".join(f"{r[k]:.{d}f}" for k, _, d in KEYS) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
