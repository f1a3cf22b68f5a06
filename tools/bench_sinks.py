#!/usr/bin/env python3
"""What the outputs cost: frame-loop time with all sinks on vs off, and sink time per 1,000 frames
over a long run (constant if nothing grows with the run length).

    python tools/bench_sinks.py loop  --frames 200            # real model, real clip: p50/p99 ms on vs off
    python tools/bench_sinks.py long  --frames 10000          # replayed results: sink ms per 1,000 frames

``loop`` runs the bundled model (or ``--weights``) through ``StreamPipeline`` on a clip twice: with a
``NullSink`` only, then with files (+ ``--save-frames``) and a Rerun recording; it prints the frame-loop
time (engine + map + sinks on the loop thread) p50/p99 and the hot-path "sinks" stage.

``long`` replays one real result with a new index/stamp per frame, and one of 100 camera positions
(the map saturates, as in a room), through files + Rerun sinks (no network: it measures the outputs
alone) and prints, per 1,000-frame window, the ms the loop thread
spent handing results to sinks and the ms the background sinks spent working.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamrecon.engine import StreamEngine  # noqa: E402
from streamrecon.mapping import GlobalMap  # noqa: E402
from streamrecon.pipeline import LoadedModel, PipelineOptions, StreamPipeline, engine_config, load_resolved, map_config  # noqa: E402
from streamrecon.settings import EngineSettings, MapSettings, PipelineConfig  # noqa: E402
from streamrecon.sinks import BackgroundSink, FileSink, NullSink  # noqa: E402
from streamrecon.sources import open_source  # noqa: E402


def _sinks(out: Path, on: bool, save_frames: bool):
    if not on:
        return [NullSink()]
    from streamrecon.sinks.rerun_sink import RerunConfig, RerunSink

    return [BackgroundSink(FileSink(out, save_frames=save_frames, flush_every=100), maxsize=64, drop=False),
            BackgroundSink(RerunSink(RerunConfig(save_path=str(out / "rec.rrd"))), maxsize=64, drop=True)]


def _pipeline(loaded: LoadedModel, cfg: PipelineConfig, sinks) -> StreamPipeline:
    engine = StreamEngine(loaded.model, engine_config(cfg.engine, loaded.model))
    return StreamPipeline(engine, GlobalMap(map_config(cfg.map, loaded)), sinks,
                          PipelineOptions(consolidate_every=200, flush_every=100))


def loop(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    loaded = load_resolved(EngineSettings(weights=args.weights))
    cfg = PipelineConfig(engine=EngineSettings(weights=args.weights), map=MapSettings())
    frames = [f for _, f in zip(range(args.frames), open_source(args.source, repeat=100))]
    report = {}
    for label, on in (("off", False), ("on", True), ("off2", False), ("on2", True)):
        with tempfile.TemporaryDirectory() as d:
            pipe = _pipeline(loaded, cfg, _sinks(Path(d), on, args.save_frames))
            loop_ms = []
            for f in frames:
                t0 = time.perf_counter()
                pipe.push(f)
                loop_ms.append(1e3 * (time.perf_counter() - t0))
            s = pipe.close()
            warm = np.asarray(loop_ms[5:])
            report[label] = {"loop_p50": round(float(np.percentile(warm, 50)), 2),
                             "loop_p99": round(float(np.percentile(warm, 99)), 2),
                             "sinks_p50": s.latency_ms["sinks"]["p50"], "sinks_p99": s.latency_ms["sinks"]["p99"],
                             "sink_stats": s.sinks}
    return report


def long(args) -> dict:
    loaded = load_resolved(EngineSettings(weights=args.weights))
    cfg = PipelineConfig()
    frame = next(iter(open_source(args.source)))
    seed_pipe = _pipeline(loaded, cfg, [NullSink()])
    base = seed_pipe.engine.process(frame)
    with tempfile.TemporaryDirectory() as d:
        pipe = _pipeline(loaded, cfg, _sinks(Path(d), True, False))
        windows, busy_prev, hot_prev, t_all = [], 0.0, 0.0, 0.0
        offsets = np.random.default_rng(0).normal(0, 0.05, (100, 3))
        for i in range(args.frames):
            T = base.T_wc.copy()
            T[:3, 3] += offsets[i % len(offsets)]  # a camera moving around one room: the map saturates
            R, t = T[:3, :3].astype(np.float32), T[:3, 3].astype(np.float32)
            r = dataclasses.replace(base, index=i, seq=i, stamp=i / 30.0, T_wc=T, points_world_pose=base.points_cam @ R.T + t)
            t0 = time.perf_counter()
            pipe.consume(r)
            t_all += 1e3 * (time.perf_counter() - t0)
            if (i + 1) % 1000 == 0:
                busy = sum(v["busy_ms"] for v in pipe.sink_stats().values())
                windows.append({"frames": i + 1, "consume_ms": round(t_all, 1),
                                "loop_thread_sink_ms": round(pipe.sink_ms_total - hot_prev, 1),
                                "sink_workers_ms": round(busy - busy_prev, 1), "map_points": len(pipe.gmap)})
                busy_prev, hot_prev, t_all = busy, pipe.sink_ms_total, 0.0
        s = pipe.close()
        size = (Path(d) / "trajectory.txt").stat().st_size
    return {"windows": windows, "trajectory_bytes": size, "sinks": s.sinks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["loop", "long"])
    ap.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "cut3r_examples" / "lady-running.mp4"))
    ap.add_argument("--weights", default=None, help="default: the bundled model")
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-frames", action="store_true")
    args = ap.parse_args()
    print(json.dumps(loop(args) if args.mode == "loop" else long(args), indent=1))


if __name__ == "__main__":
    main()
