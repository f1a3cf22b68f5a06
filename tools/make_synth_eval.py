"""Render the synthetic evaluation sets of docs/ACCURACY.md (seeded, so anyone gets the same frames).

    python tools/make_synth_eval.py heldout OUT   # 10 sequences, 320x240, 30 frames, seeds 90,000,000+
    python tools/make_synth_eval.py loops OUT     # 4 orbits that close (1.2 turns), 320x240, seeds 92,000,000+
    python tools/make_synth_eval.py dynamic OUT   # 12 sequences with 3 moving objects and ground-truth motion
                                                  # masks (dynamic/), 320x240, 30 frames, seeds 91,000,000+

``streamrecon eval OUT --backend none --backend track --backend slam`` scores them.
"""

from __future__ import annotations

import argparse
import math


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", choices=("heldout", "loops", "dynamic"))
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=None, help="how many sequences")
    ap.add_argument("--seed", type=int, default=None, help="first seed (default: the set's own; another range gives "
                                                           "a tuning set apart from the evaluation set)")
    args = ap.parse_args()

    from streamrecon.synth.dataset import SynthConfig, make_dataset, render_sequence, write_sequence

    seed0 = {"heldout": 90_000_000, "dynamic": 91_000_000, "loops": 92_000_000}[args.which] if args.seed is None else args.seed
    if args.which == "heldout":
        make_dataset(args.out, args.n or 10, seed0, SynthConfig(height=240, width=320, frames=30))
        return
    if args.which == "dynamic":
        # movers placed where the camera looks; a sequence is kept when they are seen in a third of its
        # frames or more (the seeds tried are fixed, so the set is the same everywhere)
        from pathlib import Path

        cfg = SynthConfig(height=240, width=320, frames=30, moving=3, speed=(0.02, 0.04), movers_in_view=True)
        kept, seed = 0, seed0
        while kept < (args.n or 12):
            seq = render_sequence(seed, cfg)
            seen = seq["dynamic"].reshape(len(seq["dynamic"]), -1).any(1).mean()
            if seen >= 1 / 3:
                write_sequence(seq, Path(args.out) / f"seq_{seed:06d}")
                kept += 1
            print(f"seed {seed}: movers in {seen:.0%} of the frames{'' if seen >= 1 / 3 else ' (skipped)'}", flush=True)
            seed += 1
        return
    # an orbit's angular step is (0.5..1.5) * step / radius (radius <= 1.5 m): 1.2 turns of the slowest
    # possible orbit at step 0.06 m is 1.2 * 2 pi * 1.5 / (0.5 * 0.06) frames; keep it bounded instead
    frames = int(1.2 * 2 * math.pi / (0.06 / 1.0))
    make_dataset(args.out, args.n or 4, seed0, SynthConfig(height=240, width=320, frames=frames,
                                                                kinds=("orbit",), step=0.06))


if __name__ == "__main__":
    main()
