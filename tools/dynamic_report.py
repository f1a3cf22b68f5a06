"""One table for the dynamic-mask figures of docs/ACCURACY.md: every row of an ``eval --json`` report
aggregated over its sequences, with a position-prior baseline for the masks.

    python tools/make_synth_eval.py dynamic /tmp/dyn
    streamrecon eval /tmp/dyn --backend none --backend none+dynamic-mask=flow ... --json dyn.json
    python tools/dynamic_report.py dyn.json /tmp/dyn

Mask IoU / precision / recall from the pixel counts summed over every sequence; the map figures are
means over sequences. The **position prior** masks, in each sequence, the pixels where the *other*
sequences' movers were most often (leave one sequence out; its threshold is the one that gives
the best IoU on those other sequences): what knowing only where movers tend to appear in the image
achieves, with no look at the frames.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np


def _aggregate(report: dict) -> dict[str, dict]:
    keys = {"accuracy": "acc m", "coverage": "cov@5cm", "fscore": "F@5cm", "map_dynamic_fraction": "from movers",
            "masked_fraction": "masked", "ate_sim3_pct": "ATE %", "ms_per_frame": "ms/frame"}
    rows: dict[str, dict] = {}
    for s in report["sequences"]:
        for r in s["rows"]:
            a = rows.setdefault(r["label"], {"tp": 0, "fp": 0, "fn": 0, **{k: [] for k in keys}})
            for k in ("tp", "fp", "fn"):
                a[k] += int(r.get(f"mask_{k}") or 0)
            for k in keys:
                a[k].append(r.get(k, math.nan))
    return rows


def _prior_baseline(root: Path, size: int) -> tuple[int, int, int]:
    """Leave-one-sequence-out position prior (counts summed over the sequences)."""
    import cv2

    from streamrecon.preprocess import plan_crop
    from streamrecon.synth.dataset import read_sequence

    masks = []
    for d in sorted(root.glob("seq_*")):
        m = read_sequence(d)["dynamic"]
        crop = plan_crop(*m.shape[1:3], size)
        h1, w1 = crop.resized_hw
        x0, y0 = crop.crop_xy
        h, w = crop.output_hw
        masks.append(np.stack([cv2.resize(f.astype(np.uint8), (w1, h1), interpolation=cv2.INTER_NEAREST)
                               [y0:y0 + h, x0:x0 + w] > 0 for f in m]))
    total = np.zeros(3, np.int64)
    for i, held in enumerate(masks):
        others = [m for j, m in enumerate(masks) if j != i]
        prior = np.concatenate(others).mean(0)
        best, best_iou = 0.5, -1.0
        for t in np.linspace(0.02, 0.6, 30):
            c = sum(np.array([(m & (prior > t)).sum(), (~m & (prior > t)).sum(), (m & ~(prior > t)).sum()]) for m in others)
            iou = c[0] / max(1, c.sum())
            if iou > best_iou:
                best, best_iou = t, iou
        pred = prior > best
        total += [(held & pred).sum(), (~held & pred).sum(), (held & ~pred).sum()]
    return tuple(int(v) for v in total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report", help="streamrecon eval --json output")
    ap.add_argument("sequences", nargs="?", help="the sequences' folder (for the position-prior baseline)")
    ap.add_argument("--size", type=int, default=160, help="the model input size the report ran at")
    args = ap.parse_args()
    rows = _aggregate(json.loads(Path(args.report).read_text()))
    if args.sequences:
        tp, fp, fn = _prior_baseline(Path(args.sequences), args.size)
        rows["position prior (masks only)"] = {"tp": tp, "fp": fp, "fn": fn}
    cols = ("masked_fraction", "accuracy", "coverage", "fscore", "map_dynamic_fraction", "ate_sim3_pct", "ms_per_frame")
    names = ("masked", "acc m", "cov@5cm", "F@5cm", "from movers", "ATE %", "ms/frame")
    print("| | mask IoU | mask P | mask R | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * (3 + len(names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for label, a in rows.items():
            tp, fp, fn = a["tp"], a["fp"], a["fn"]
            cells = [tp / (tp + fp + fn) if tp + fp + fn else math.nan, tp / (tp + fp) if tp + fp else math.nan,
                     tp / (tp + fn) if tp + fn else math.nan]
            cells += [float(np.nanmean(a[c])) if a.get(c) else math.nan for c in cols]
            text = ["–" if not math.isfinite(v) else (f"{v:.0f}" if c == "ms_per_frame" else f"{v:.1f}" if c == "ate_sim3_pct"
                    else f"{v:.3f}") for v, c in zip(cells, ("", "", "") + cols)]
            print(f"| {label} | " + " | ".join(text) + " |")


if __name__ == "__main__":
    main()
