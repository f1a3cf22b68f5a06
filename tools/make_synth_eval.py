"""Render the synthetic evaluation sets of docs/ACCURACY.md (seeded, so anyone gets the same frames).

    python tools/make_synth_eval.py heldout OUT   # 10 sequences, 320x240, 30 frames, seeds 90,000,000+
    python tools/make_synth_eval.py loops OUT     # 4 orbits that close (1.2 turns), 320x240, seeds 92,000,000+

``streamrecon eval OUT --backend none --backend track --backend slam`` scores them.
"""

from __future__ import annotations

import argparse
import math


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", choices=("heldout", "loops"))
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=None, help="how many sequences")
    args = ap.parse_args()

    from streamrecon.synth.dataset import SynthConfig, make_dataset

    if args.which == "heldout":
        make_dataset(args.out, args.n or 10, 90_000_000, SynthConfig(height=240, width=320, frames=30))
        return
    # an orbit's angular step is (0.5..1.5) * step / radius (radius <= 1.5 m): 1.2 turns of the slowest
    # possible orbit at step 0.06 m is 1.2 * 2 pi * 1.5 / (0.5 * 0.06) frames; keep it bounded instead
    frames = int(1.2 * 2 * math.pi / (0.06 / 1.0))
    make_dataset(args.out, args.n or 4, 92_000_000, SynthConfig(height=240, width=320, frames=frames,
                                                                kinds=("orbit",), step=0.06))


if __name__ == "__main__":
    main()
