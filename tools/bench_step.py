#!/usr/bin/env python3
"""Per-frame step time and peak RSS of a preset with random weights (CPU or GPU).

Example:
    python tools/bench_step.py --preset cut3r_224_linear --size 224x224 --frames 5 --threads 2
    python tools/bench_step.py --preset cut3r_512_dpt --size 384x512 --frames 5 --threads 2
    python tools/bench_step.py --preset cut3r_512_dpt --size 384x512 --frames 3 --heads both   # full vs minimal

``--heads both`` steps every frame twice from the same state, alternating which goes first, and
prints both medians and their ratio from that one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

from streamrecon import FrameInput, create_model


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cut3r_224_linear")
    ap.add_argument("--size", default="224x224", help="HxW of the model input")
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    ap.add_argument("--heads", default="full", choices=("full", "minimal", "both"),
                    help="which heads to run (both: full and minimal alternating, with the ratio)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))

    t0 = time.perf_counter()
    model = create_model(args.preset, device=args.device, seed=0)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    state = model.init_state(1)
    img = torch.rand(1, 3, h, w, device=args.device) * 2 - 1
    kinds = ("full", "minimal") if args.heads == "both" else (args.heads,)
    by_kind: dict[str, list[float]] = {k: [] for k in kinds}
    rss = []

    def timed(kind: str, st):
        if args.device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        _, nxt = model.step(FrameInput(img=img), st, heads=kind)
        if args.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t, nxt

    with torch.inference_mode():
        for i in range(args.warmup + args.frames):
            order = kinds if i % 2 == 0 else kinds[::-1]
            nxt = None
            for kind in order:
                dt, out_state = timed(kind, state)
                nxt = out_state if nxt is None else nxt
                if i >= args.warmup:
                    by_kind[kind].append(dt)
            state = nxt
            if i >= args.warmup:
                rss.append(rss_mb())
    times = by_kind[kinds[0]]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "preset": args.preset, "size": [h, w], "threads": args.threads, "device": args.device,
        "params": n_params, "build_s": round(build_s, 2), "frames": args.frames,
        "step_ms_median": round(1000 * statistics.median(times), 1), "step_ms_min": round(1000 * min(times), 1),
        "step_ms_max": round(1000 * max(times), 1), "fps": round(1 / statistics.median(times), 3),
        "rss_mb_first": round(rss[0]), "rss_mb_last": round(rss[-1]), "peak_rss_mb": round(peak_mb),
        "heads": args.heads,
    }
    if args.heads == "both":
        full, minimal = statistics.median(by_kind["full"]), statistics.median(by_kind["minimal"])
        result.update(step_ms_median_full=round(1000 * full, 1), step_ms_median_minimal=round(1000 * minimal, 1),
                      minimal_over_full=round(minimal / full, 3))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
