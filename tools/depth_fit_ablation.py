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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--weights", default=None, help="default: the bundled model")
    ap.add_argument("--max-frames", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from streamrecon.eval.datasets import find_sequences
    from streamrecon.eval.real import evaluate_backends
    from streamrecon.pipeline import load_resolved
    from streamrecon.settings import EngineSettings
    from streamrecon.weights import bundled_weights

    loaded = load_resolved(EngineSettings(weights=args.weights or str(bundled_weights()), device="cpu"))
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
