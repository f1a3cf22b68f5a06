"""Copy trained weights into the package as the bundled model.

Usage: python tools/bundle_model.py outputs/train_small/best.safetensors

Rewrites the weights as float16 safetensors at ``streamrecon/weights/streamrecon_small.safetensors``
with its ``.json`` sidecar (config, training step, validation AbsRel) and checks the size limit.

It also calibrates the map's confidence threshold for this model (metadata ``conf_thresh``: the map
filter of ``run`` / ``serve`` / ``demo`` and the map metrics of ``eval``, unless ``run`` / ``serve``
are given ``--conf-thresh``): the ``--keep`` quantile of
the self-view confidences over held-out synthetic sequences (seeds 90,000,200+, used by nothing else),
so the map keeps the more confident part of every frame. The official checkpoints carry no such value
and keep the reference demo's 1.5.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from streamrecon.checkpoint import load_model
from streamrecon.checkpoint.io import write_safetensors
from streamrecon.weights import BUNDLED_NAME

LIMIT_MB = 25.0
CALIB_SEED0 = 90_000_200


def calibrate_conf_thresh(model, keep: float, sequences: int = 4, frames: int = 16) -> float:
    """Confidence below which the least confident ``1 - keep`` of the pixels fall."""
    import numpy as np

    from streamrecon.engine import EngineConfig, Frame, StreamEngine, default_size
    from streamrecon.synth.dataset import SynthConfig, render_sequence

    confs = []
    for k in range(sequences):
        seq = render_sequence(CALIB_SEED0 + k, SynthConfig(height=112, width=160, frames=frames, virtual=0))
        engine = StreamEngine(model, EngineConfig(size=default_size(model)))
        for i, img in enumerate(seq["rgb"]):
            confs.append(engine.process(Frame(image=img, seq=i, stamp=i / 30)).conf_cam.ravel())
    return float(np.quantile(np.concatenate(confs), 1.0 - keep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", type=Path)
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of pixels the calibrated threshold keeps")
    args = ap.parse_args()
    src_meta = json.loads(args.weights.with_suffix(".json").read_text())
    model = load_model(args.weights, device="cpu")
    dst = Path(__file__).resolve().parents[1] / "streamrecon" / "weights" / BUNDLED_NAME
    extra = {k: str(v) for k, v in src_meta.items() if k not in ("config", "weights")}
    extra["source"] = args.weights.name
    extra["conf_thresh"] = f"{calibrate_conf_thresh(model, args.keep):.4f}"
    extra["conf_thresh_keep"] = str(args.keep)
    write_safetensors(model.state_dict(), model.cfg, dst, extra_meta=extra, dtype=torch.float16)
    size = dst.stat().st_size / 1e6
    if size > LIMIT_MB:
        raise SystemExit(f"{dst}: {size:.1f} MB exceeds the {LIMIT_MB} MB package limit")
    print(f"wrote {dst} ({size:.1f} MB) from {args.weights} {extra}")


if __name__ == "__main__":
    main()
