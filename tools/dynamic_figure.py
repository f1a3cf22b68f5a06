"""The dynamic-mask picture of the docs: a video through ``streamrecon run`` once per cue, a few frames
side by side (input, then per cue the score and the mask over the input).

    python tools/dynamic_figure.py ../shared/data/cut3r_examples/lady-running.mp4 docs/images/dynamic_lady_running.jpg
    python tools/dynamic_figure.py VIDEO OUT.jpg --methods flow attention --frames 10 25 40 --max-frames 45

Uses the same pipeline as ``run`` (``build_pipeline``, no files written) and prints each cue's mean
masked fraction and time per frame.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np


def _run(video: str, method: str, max_frames: int, weights) -> list:
    from streamrecon.pipeline import build_pipeline, load_resolved
    from streamrecon.settings import EngineSettings, MapSettings, PipelineConfig
    from streamrecon.sources import open_source

    cfg = PipelineConfig(engine=EngineSettings(weights=weights), map=MapSettings(dynamic_mask=method))
    pipe = build_pipeline(cfg, load_resolved(cfg.engine), stream_id="figure", files=False)
    out = []
    src = open_source(video)
    try:
        for i, frame in enumerate(src.frames()):
            if i >= max_frames:
                break
            out.append((frame.image, pipe.push(frame)))
    finally:
        src.close()
        stats = pipe.close().map.get("dynamic_mask", {})
    print(f"{method}: masked {stats.get('masked_fraction', 0):.3f} of the pixels on average, "
          f"{stats.get('ms_per_frame', 0):.1f} ms per frame")
    return out


def _panel(rgb: np.ndarray, score, mask, h: int) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    w = int(round(rgb.shape[1] * h / rgb.shape[0]))
    base = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    s = np.zeros((h, w), np.float32) if score is None else cv2.resize(score.astype(np.float32), (w, h))
    heat = cv2.applyColorMap((s * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
    over = base.copy()
    if mask is not None:
        m = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        over[m] = (0.45 * over[m] + 0.55 * np.array([255, 40, 40])).astype(np.uint8)
    return heat, over


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("video")
    ap.add_argument("out")
    ap.add_argument("--methods", nargs="+", default=["flow", "attention"])
    ap.add_argument("--frames", nargs="+", type=int, default=[12, 30, 48])
    ap.add_argument("--max-frames", type=int, default=50)
    ap.add_argument("--weights", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--height", type=int, default=180, help="height of one panel")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import cv2

    runs = {m: _run(args.video, m, args.max_frames, args.weights) for m in args.methods}
    rows = []
    for i in args.frames:
        crop_rgb = runs[args.methods[0]][i][1].colors  # what the model saw
        cells = [cv2.resize(crop_rgb, (int(round(crop_rgb.shape[1] * args.height / crop_rgb.shape[0])), args.height),
                            interpolation=cv2.INTER_AREA)]
        for m in args.methods:
            r = runs[m][i][1]
            cells += list(_panel(r.colors, r.dynamic, r.dynamic_mask, args.height))
        rows.append(np.hstack([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells]))
    head_h = 22
    labels = ["input"] + [f"{m} {k}" for m in args.methods for k in ("score", "mask")]
    head = np.full((head_h, rows[0].shape[1], 3), 255, np.uint8)
    cell_w = rows[0].shape[1] // len(labels)
    for k, text in enumerate(labels):
        cv2.putText(head, text, (k * cell_w + 6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    img = np.vstack([head] + rows)
    cv2.imwrite(args.out, img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(f"wrote {args.out} ({img.shape[1]}x{img.shape[0]})")


if __name__ == "__main__":
    main()
