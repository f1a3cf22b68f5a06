"""``streamrecon bench``: per-stage latency, fps, memory and achieved TFLOP/s of the per-frame path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import UserError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a preset or checkpoint (latency by stage, fps, memory, TFLOP/s)")
    p.add_argument("--model", default="streamrecon_small", help="preset (random weights) or checkpoint path")
    p.add_argument("--size", default="112x160", help="frame size HxW (224x224 = square crop), or a long side")
    p.add_argument("--batch", type=int, default=1, help="streams stepped together")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--images", default="random", help="random, or a video/folder to take frames from")
    p.add_argument("--memory-every", type=int, default=0, help="sample memory every N frames")
    p.add_argument("--no-map", action="store_true", help="skip map integration")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, format_bench, run_benchmark, save_report

    cfg = BenchConfig(model=args.model, size=args.size, batch=args.batch, dtype=args.dtype, device=args.device,
                      frames=args.frames, warmup=args.warmup, images=args.images, threads=0,
                      memory_every=args.memory_every, with_map=not args.no_map, compile=args.compile)
    try:
        rep = run_benchmark(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    print(format_bench(rep))
    print(json.dumps({k: rep[k] for k in ("fps_per_stream", "fps_aggregate", "gflop_per_step", "achieved_tflops")}))
    if args.json:
        save_report(rep, args.json)
    return 0
