#!/usr/bin/env python3
"""Average the weights of several checkpoints of one architecture (e.g. the last few of a run).

Usage: python tools/average_weights.py OUT.safetensors A.safetensors B.safetensors [...]

Checkpoint to checkpoint, the real-set depth scores of a small model trained here swing more than
recipes differ (docs/BUNDLED_MODEL.md); the mean of the last few checkpoints is a steadier thing to
compare or bundle. All inputs must have the same model config; the output is float32 with the first
input's config and a ``averaged_from`` metadata entry.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from streamrecon.checkpoint import load_model
from streamrecon.checkpoint.io import write_safetensors


def average(paths: list[str]) -> tuple[dict, object]:
    """The element-wise mean state dict of the checkpoints, and their shared config."""
    models = [load_model(p) for p in paths]
    cfg = models[0].cfg
    for p, m in zip(paths[1:], models[1:]):
        if asdict(m.cfg) != asdict(cfg):
            raise ValueError(f"{p}: a different model config than {paths[0]}; only one architecture can be averaged")
    states = [m.state_dict() for m in models]
    mean = {k: torch.stack([s[k].float() for s in states]).mean(0) if states[0][k].is_floating_point() else states[0][k]
            for k in states[0]}
    return mean, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    args = ap.parse_args()
    if len(args.inputs) < 2:
        ap.error("give at least two checkpoints to average")
    mean, cfg = average(args.inputs)
    write_safetensors(mean, cfg, args.out, extra_meta={"averaged_from": ",".join(Path(p).name for p in args.inputs)})
    print(f"wrote {args.out}: the mean of {len(args.inputs)} checkpoints")


if __name__ == "__main__":
    main()
