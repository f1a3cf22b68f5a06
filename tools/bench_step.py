#!/usr/bin/env python3
"""Per-frame step time and peak RSS of a preset with random weights (CPU or GPU).

Example:
    python tools/bench_step.py --preset cut3r_224_linear --size 224x224 --frames 5 --threads 2
    python tools/bench_step.py --preset cut3r_512_dpt --size 384x512 --frames 5 --threads 2
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))

    t0 = time.perf_counter()
    model = create_model(args.preset, device=args.device, seed=0)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    state = model.init_state(1)
    img = torch.rand(1, 3, h, w, device=args.device) * 2 - 1
    times, rss = [], []
    with torch.inference_mode():
        for i in range(args.warmup + args.frames):
            if args.device != "cpu":
                torch.cuda.synchronize()
            t = time.perf_counter()
            _, state = model.step(FrameInput(img=img), state)
            if args.device != "cpu":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
                rss.append(rss_mb())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "preset": args.preset, "size": [h, w], "threads": args.threads, "device": args.device,
        "params": n_params, "build_s": round(build_s, 2), "frames": args.frames,
        "step_ms_median": round(1000 * statistics.median(times), 1), "step_ms_min": round(1000 * min(times), 1),
        "step_ms_max": round(1000 * max(times), 1), "fps": round(1 / statistics.median(times), 3),
        "rss_mb_first": round(rss[0]), "rss_mb_last": round(rss[-1]), "peak_rss_mb": round(peak_mb),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
