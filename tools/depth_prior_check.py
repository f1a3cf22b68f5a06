"""Does a model's depth come from the image, or from where a pixel sits in the frame?

    python tools/depth_prior_check.py ../shared/data/cut3r_examples/lady-running.mp4 \
        ../shared/data/sun3d_studyroom/fragment-1-rgbd-frames [--weights W] [--frames 10]

For frames of each source, each as the first frame of a fresh stream (no state carried over):

* ``flipped, same content``: Pearson correlation of log depth between the frame and the same
  frame upside down, its depth flipped back (the same scene points compared). Depth read from the
  image gives a high correlation here.
* ``flipped, same pixel``: the same two depth maps compared pixel for pixel without flipping back
  (different scene points at the same image position). High here means depth comes from where a
  pixel sits in the image, not from what it shows.
* ``unrelated image``: correlation with the depth of a frame of another source (resized to this
  one's shape): high means the depth barely depends on the image at all.
* with ground-truth depth (SUN3D folders: ``*.depth.png`` in millimetres beside the images, or a
  ``depth/`` folder): correlation of the prediction with the ground truth, beside that of a
  per-row mean of the ground truth over the whole set (the best an image-position prior can do).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np


def _corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    a, b = np.log(np.maximum(a, 1e-6)).ravel(), np.log(np.maximum(b, 1e-6)).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    if mask is not None:
        keep &= mask.ravel()
    return float(np.corrcoef(a[keep], b[keep])[0, 1]) if keep.sum() > 10 else float("nan")


def _gt_depth(image_path: Path | None) -> np.ndarray | None:
    if image_path is None:
        return None
    import cv2

    cand = [image_path.with_name(image_path.name.split(".")[0] + ".depth.png"),
            image_path.parent.parent / "depth" / image_path.with_suffix(".png").name]
    for c in cand:
        if c.exists():
            d = cv2.imread(str(c), cv2.IMREAD_UNCHANGED)
            return d.astype(np.float32) / 1000.0 if d is not None else None
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--frames", type=int, default=10)
    args = ap.parse_args()
    import cv2

    from streamrecon.engine import EngineConfig, Frame, StreamEngine, default_size
    from streamrecon.pipeline import load_resolved
    from streamrecon.settings import EngineSettings
    from streamrecon.sources import open_source

    loaded = load_resolved(EngineSettings(weights=args.weights))
    size = default_size(loaded.model)

    def depth(img: np.ndarray) -> np.ndarray:
        eng = StreamEngine(loaded.model, EngineConfig(size=size))
        return eng.process(Frame(image=np.ascontiguousarray(img), seq=0, stamp=0.0, source="check")).depth

    print(f"weights: {loaded.info.path}")
    loaded_sources = []
    for spec in args.sources:
        src = open_source(spec)
        frames = list(src)
        src.close()
        pick = np.linspace(0, len(frames) - 1, min(args.frames, len(frames))).round().astype(int)
        imgs = [frames[i].image for i in pick]
        paths = [getattr(frames[i], "path", None) for i in pick]
        if all(p is None for p in paths) and Path(spec).is_dir():
            files = sorted(p for p in Path(spec).iterdir() if p.suffix.lower() in (".jpg", ".png") and
                           ".depth." not in p.name)
            paths = [files[i] if i < len(files) else None for i in pick]
        d = [depth(im) for im in imgs]
        flips = [depth(im[::-1]) for im in imgs]
        content = [_corr(di, fi[::-1]) for di, fi in zip(d, flips)]
        position = [_corr(di, fi) for di, fi in zip(d, flips)]
        loaded_sources.append((spec, imgs, paths, d, content, position))
    print("| source | frames | flipped, same content | flipped, same pixel | unrelated image | vs GT depth | "
          "per-row GT mean vs GT |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, (spec, imgs, paths, d, content, position) in enumerate(loaded_sources):
        others = [o for j, src in enumerate(loaded_sources) if j != k for o in src[3]]
        h, w = d[0].shape
        unrelated = [_corr(di, cv2.resize(o, (w, h), interpolation=cv2.INTER_LINEAR)) for di in d for o in others[:10]]
        gts = [_gt_depth(Path(p)) if p else None for p in paths]
        gt_txt = row_txt = "-"
        if all(g is not None for g in gts):
            h, w = d[0].shape
            g_small = [cv2.resize(g, (w, h), interpolation=cv2.INTER_NEAREST) for g in gts]
            valid = [g > 0 for g in g_small]
            gt_txt = f"{np.nanmean([_corr(di, g, v) for di, g, v in zip(d, g_small, valid)]):.2f}"
            stack = np.where(np.stack(valid), np.log(np.maximum(np.stack(g_small), 1e-6)), np.nan)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # rows with no valid depth at all
                row_prior = np.exp(np.nanmean(stack, axis=(0, 2)))[:, None].repeat(w, axis=1)
            row_txt = f"{np.nanmean([_corr(row_prior, g, v) for g, v in zip(g_small, valid)]):.2f}"
        print(f"| {Path(spec).name} | {len(imgs)} | {np.nanmean(content):.2f} | {np.nanmean(position):.2f} | "
              f"{np.nanmean(unrelated) if unrelated else float('nan'):.2f} | {gt_txt} | {row_txt} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
