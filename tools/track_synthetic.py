"""Tracking accuracy on rendered synthetic sequences, for tuning the tracker's settings.

    python tools/track_synthetic.py --seeds 1-10 --config '{}' --config '{"win": 21, "win_retry": null}'

Each seed renders one 320x240 sequence (``streamrecon.synth``, 30 frames, trajectory kind by seed);
the tracker (``streamrecon.slam.tracker``, local BA in the calling thread: deterministic) follows it
with the true depth as its prior, once per ``--config`` (a JSON object of ``TrackerConfig`` fields
over the defaults). Prints ATE in % of the path length (Sim(3)-aligned) per seed and config, the
mean and median, the rotation RPE in degrees per frame (what scores the pure-rotation sequences,
which have no path), the identity and random-walk baselines of each sequence beside them, and the
number of weak frames tracked again (``r``: ``retries``). Nothing is written; nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def track(seq: dict, cfg) -> tuple[np.ndarray, int]:
    """``seq`` as from ``render_sequence``; returns ``(N, 4, 4)`` camera-to-world and the retries."""
    import cv2

    from streamrecon.slam.tracker import Tracker

    tr = Tracker(cfg)
    out = []
    for i, rgb in enumerate(seq["rgb"]):
        d = seq["depth"][i]

        def depth_at(px, T_wc=None, d=d):
            u = np.clip(np.rint(px[:, 0]).astype(int), 0, d.shape[1] - 1)
            v = np.clip(np.rint(px[:, 1]).astype(int), 0, d.shape[0] - 1)
            return d[v, u].astype(np.float64)

        out.append(tr.track(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), seq["K"], depth_at, np.eye(4)).T_wc)
    return np.stack(out), tr.retries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1-10", help="e.g. 1-10 or 1,3,5")
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--config", action="append", default=None,
                    help="JSON TrackerConfig fields over the defaults (repeatable; default: '{}')")
    args = ap.parse_args(argv)

    from streamrecon.eval.baselines import random_walk_like
    from streamrecon.eval.metrics import ate, rpe
    from streamrecon.slam.tracker import TrackerConfig
    from streamrecon.synth.dataset import SynthConfig, render_sequence

    configs = args.config or ["{}"]
    try:
        cfgs = [TrackerConfig(**{"ba_sync": True, **json.loads(c)}) for c in configs]
    except (ValueError, TypeError) as e:
        ap.error(f"--config: {e}")
    res = {c: [] for c in configs}
    rot = {c: [] for c in configs}
    head = "ATE % / deg per frame"
    print(f"{'seed':>4} {'kind':>10} " + " ".join(f"{'cfg' + str(j) + ' ' + head:>28}" for j in range(len(configs)))
          + f" {'identity':>16} {'random walk':>16}")

    def score(T, gt):
        return ate(T, gt, True)["percent_of_path"], rpe(T, gt)["rot_rmse_deg"]
    for seed in _seeds(args.seeds):
        seq = render_sequence(seed, SynthConfig(height=240, width=320, frames=args.frames, virtual=0, supersample=1))
        gt = seq["T_wc"]
        row = []
        for c, cfg in zip(configs, cfgs):
            T, retries = track(seq, cfg)
            a, r = score(T, gt)
            res[c].append(a)
            rot[c].append(r)
            row.append(f"{a:6.2f} / {r:5.3f} (r{retries:3d})")
        ident = "{:6.2f} / {:5.3f}".format(*score(np.tile(np.eye(4), (len(gt), 1, 1)), gt))
        walk = "{:6.2f} / {:5.3f}".format(*score(random_walk_like(gt, seed), gt))
        print(f"{seed:>4} {seq['kind']:>10} " + " ".join(f"{r:>28}" for r in row) + f" {ident:>16} {walk:>16}")
        sys.stdout.flush()
    for j, c in enumerate(configs):
        v = np.array(res[c])
        print(f"cfg{j} {c}: ATE mean {np.nanmean(v):.2f} %, median {np.nanmedian(v):.2f} % (sequences with a path); "
              f"rotation RPE mean {np.mean(rot[c]):.3f} deg/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())
