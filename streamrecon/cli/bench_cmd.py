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
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16", "int8"], default=None,
                   help="one or more: several (or several --heads) run the same frames through each, with ratios "
                        "and drift against the first from that one run")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="deprecated: use --precision")
    p.add_argument("--heads", nargs="+", choices=["full", "minimal"], default=["full"],
                   help="one or both (see --precision)")
    p.add_argument("--backend", choices=["none", "track", "slam"], default="none",
                   help="track / slam: also run the whole pipeline per variant and report poses/s beside the "
                        "network's frames/s (needs --images from a real video or folder)")
    p.add_argument("--network-every", default="1", help="with --backend: the network on every N-th frame "
                                                         "(or auto), tracking on every frame")
    p.add_argument("--intrinsics", default=None, help="with --backend: known fx,fy,cx,cy")
    p.add_argument("--ba-worker", nargs="+", choices=["auto", "thread", "process"], default=["auto"],
                   help="with --backend: where the local bundle adjustment runs; several: the pose-rate run is "
                        "repeated for each, with ratios against the first")
    p.add_argument("--network-frames", type=int, default=0, help="with several variants: the network-rate part "
                                                                  "takes only the first N of --frames (0: all)")
    p.add_argument("--live", action="store_true", help="with --backend: never wait for the network (as a camera "
                                                       "would; frames that find it busy are only tracked)")
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--images", default="random", help="random, or a video/folder to take frames from")
    p.add_argument("--memory-every", type=int, default=0, help="sample memory every N frames")
    p.add_argument("--no-map", action="store_true", help="skip map integration")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the step from CUDA graphs (batch buckets "
                   "1,2,4,8; CUDA only)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    p.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from ..bench import BenchConfig, format_bench, run_benchmark, save_report

    precisions = list(args.precision or [])
    if args.dtype:
        import logging

        logging.getLogger(__name__).warning("--dtype is deprecated; use --precision")
        precisions = precisions or [{"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[args.dtype]]
    precisions = precisions or ["fp32"]
    if len(precisions) > 1 or len(args.heads) > 1 or args.backend != "none":
        return _sweep(args, precisions)
    cfg = BenchConfig(model=args.model, size=args.size, batch=args.batch, dtype=precisions[0], device=args.device,
                      frames=args.frames, warmup=args.warmup, images=args.images, threads=0,
                      memory_every=args.memory_every, with_map=not args.no_map, compile=args.compile,
                      heads=args.heads[0], cuda_graphs=args.cuda_graphs)
    try:
        rep = run_benchmark(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    print(format_bench(rep))
    print(json.dumps({k: rep[k] for k in ("fps_per_stream", "fps_aggregate", "gflop_per_step", "achieved_tflops")}))
    if args.json:
        save_report(rep, args.json)
    return 0


def _sweep(args: argparse.Namespace, precisions: list[str]) -> int:
    from ..bench import save_report
    from ..bench_sweep import SweepConfig, format_sweep, run_sweep
    from ..settings import SettingsError, parse_size

    try:
        size = parse_size(args.size) if args.size else None
        cfg = SweepConfig(model=args.model, images=args.images, size=size, frames=args.frames, warmup=min(args.warmup, 2),
                          precisions=tuple(dict.fromkeys(precisions)), heads=tuple(dict.fromkeys(args.heads)),
                          backend=args.backend, network_every=args.network_every, intrinsics=args.intrinsics,
                          live=args.live, device=args.device, network_frames=args.network_frames,
                          ba_workers=tuple(args.ba_worker))
        rep = run_sweep(cfg)
    except (ValueError, FileNotFoundError, SettingsError) as e:
        raise UserError(str(e)) from None
    print(format_sweep(rep))
    if args.json:
        save_report(rep, args.json)
    return 0
