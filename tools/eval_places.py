"""Which place-recognition descriptor retrieves better on the development set (bow vs tokens).

Every ``--step``-th frame of each sequence under DATA goes into one database (all sequences
together, so a retrieval from another sequence is wrong). Each frame queries it, excluding its
own sequence's frames closer than ``--gap`` frames; the top-1 answer is right when it is of the
same sequence and overlaps the query in the ground truth (depth reprojected: at least
``--overlap`` of the query's pixels land in the answer's image at a consistent depth; KITTI,
without depth: camera centres within 10 m and viewing directions within 30 deg).

    python tools/eval_places.py ../shared/data [--weights W] [--step 2] [--gap 10]

Prints recall@1 (queries that have a true match and got one at rank 1), precision of the
top-1 at several normalised-score thresholds, and the ms per keyframe of each descriptor.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _overlap(seq, i: int, j: int) -> float:
    """Fraction of frame i's valid depth pixels that project into frame j consistently."""
    if not seq.has_depth:
        Ti, Tj = seq.T_wc[i], seq.T_wc[j]
        close = np.linalg.norm(Ti[:3, 3] - Tj[:3, 3]) < 10.0
        ang = np.degrees(np.arccos(np.clip(Ti[:3, 2] @ Tj[:3, 2], -1, 1)))
        return 1.0 if close and ang < 30 else 0.0
    d = seq.depth(i)[::8, ::8]
    h, w = seq.depth(i).shape
    v, u = np.mgrid[0:h:8, 0:w:8]
    ok = d > 0
    K = seq.K
    X = np.stack([(u - K[0, 2]) / K[0, 0] * d, (v - K[1, 2]) / K[1, 1] * d, d], -1)[ok]
    Tw = seq.T_wc[i]
    Xw = X @ Tw[:3, :3].T + Tw[:3, 3]
    Tj = seq.T_wc[j]
    Xj = (Xw - Tj[:3, 3]) @ Tj[:3, :3]
    z = Xj[:, 2]
    front = z > 0.1
    pu = K[0, 0] * Xj[front, 0] / z[front] + K[0, 2]
    pv = K[1, 1] * Xj[front, 1] / z[front] + K[1, 2]
    inside = (pu >= 0) & (pu < w) & (pv >= 0) & (pv < h)
    dj = seq.depth(j)
    zz = dj[pv[inside].astype(int), pu[inside].astype(int)]
    good = (zz > 0) & (np.abs(zz - z[front][inside]) < 0.1 * zz)
    return float(good.sum()) / max(1, ok.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--step", type=int, default=2)
    ap.add_argument("--gap", type=int, default=10)
    ap.add_argument("--overlap", type=float, default=0.3)
    args = ap.parse_args()

    import cv2

    from streamrecon.engine import Frame
    from streamrecon.eval.datasets import find_sequences
    from streamrecon.pipeline import build_pipeline, load_resolved
    from streamrecon.settings import EngineSettings, PipelineConfig
    from streamrecon.slam.places import PlaceDatabase

    seqs = [s for s in find_sequences(args.data) if s.fmt in ("sun3d", "kitti", "apc")]
    loaded = load_resolved(EngineSettings(weights=args.weights))
    orb = cv2.ORB_create(500)
    items = []  # (seq no, frame, orb desc, token)
    ms = {"bow": 0.0, "tokens": 0.0}
    for si, seq in enumerate(seqs):
        pipe = build_pipeline(PipelineConfig(), loaded, stream_id=seq.name, files=False)
        for i in range(0, len(seq), args.step):
            img = seq.rgb(i)
            r = pipe.push(Frame(image=img, seq=i, stamp=float(i), source=seq.name))
            t0 = time.perf_counter()
            grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            _, desc = orb.detectAndCompute(grey, None)
            ms["bow"] += 1e3 * (time.perf_counter() - t0)
            items.append((si, i, desc, r.descriptor))
        pipe.close()
    for kind in ("bow", "tokens"):
        db = PlaceDatabase(kind)
        t0 = time.perf_counter()
        for n, (_, _, desc, tok) in enumerate(items):
            db.add(n, desc if kind == "bow" else tok)
        ms[kind] += 1e3 * (time.perf_counter() - t0)
        hits, total, answers = 0, 0, []
        for n, (si, i, desc, tok) in enumerate(items):
            q = desc if kind == "bow" else tok
            ranked = db.query(q, before=len(items) + 1, top=len(items))
            ranked = [(m, s) for m, s in ranked if m != n and not (items[m][0] == si and abs(items[m][1] - i) < args.gap)]
            positives = [m for m, (sj, j, _, _) in enumerate(items)
                         if sj == si and abs(j - i) >= args.gap and _overlap(seqs[si], i, j) >= args.overlap]
            if not ranked:
                continue
            top, score = ranked[0]
            right = top in positives
            # the normalised score: top-1 over the best same-sequence neighbour within the gap
            near = [s for m, s in db.query(q, before=len(items) + 1, top=len(items))
                    if m != n and items[m][0] == si and 0 < abs(items[m][1] - i) < args.gap]
            ratio = score / max(max(near) if near else score, 1e-6)
            answers.append((ratio, right))
            if positives:
                total += 1
                hits += right
        ans = np.asarray(answers)
        line = [f"{kind:7s} recall@1 {hits}/{total} = {hits / max(1, total):.3f}"]
        for th in (0.0, 0.5, 0.7, 0.8, 0.9):
            sel = ans[ans[:, 0] >= th] if len(ans) else ans
            line.append(f"prec@score>={th}: {sel[:, 1].mean() if len(sel) else float('nan'):.3f} (n={len(sel)})")
        print("  ".join(line))
    print(f"frames {len(items)} from {len(seqs)} sequences; descriptor + insertion ms per keyframe "
          "(tokens: the network computes them anyway): "
          + ", ".join(f"{k} {v / len(items):.1f}" for k, v in ms.items()))


if __name__ == "__main__":
    main()
