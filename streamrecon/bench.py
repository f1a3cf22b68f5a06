"""``streamrecon bench``: time the whole per-frame path of one or more streams.

Stages: ``preprocess`` (resize/crop/normalise), ``encoder``, ``decoders``, ``memory`` (LocalMemory
read + write), ``heads``, ``postprocess`` (poses, world points, focal), ``map`` (voxel map
integration), ``sinks`` (trajectory/file writer). Model stages are timed through the model's stage
hooks (CUDA synchronised only while benchmarking). Reports p50/p99 per stage, end-to-end fps,
aggregate fps over ``batch`` streams, peak host RSS and device memory, memory at frame 10 vs the
last frame, and achieved TFLOP/s against :func:`streamrecon.flops.step_flops`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from array import array
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .engine import EngineConfig, Frame, StreamEngine, process_batch
from .engine.stats import peak_rss_mb, rss_mb
from .flops import step_flops
from .mapping import GlobalMap, MapConfig
from .threads import report as thread_report

__all__ = ["BenchConfig", "run_benchmark", "format_bench", "precision_drift"]

_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16",  # bench dtype -> EngineConfig.precision
              "fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "int8": "int8"}

_logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """Args:
        model: preset name (random weights) or checkpoint path.
        size: model input ``"HxW"`` (frames are generated at that size, so preprocessing is a no-op
            resize) -- or an int long side applied to ``images``.
        batch: streams stepped together.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (autocast; heads and pose stay float32), or a
            ``--precision`` name (``fp32``, ``bf16``, ``fp16``, ``int8``).
        images: ``random`` or a video/folder whose frames are used (repeated).
        memory_every: sample memory every N frames.
        stage_timing: time the model stages (synchronises CUDA between them; off for pure throughput).
    """

    model: str = "streamrecon_small"
    size: str = "112x160"
    batch: int = 1
    dtype: str = "float32"
    device: str = "auto"
    frames: int = 50
    warmup: int = 5
    images: str = "random"
    threads: int = 0
    memory_every: int = 0
    with_map: bool = True
    compile: bool = False
    stage_timing: bool = True
    seed: int = 0
    heads: str = "full"
    cuda_graphs: bool = False


class _StageTimer:
    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.ms: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.ms[name] += 1e3 * (time.perf_counter() - t)


def _frames(cfg: BenchConfig, hw: tuple[int, int], n: int) -> list[np.ndarray]:
    if cfg.images == "random":
        rng = np.random.default_rng(cfg.seed)
        k = min(n, 16)  # frames are cycled: 16 shifted crops of one random image
        base = rng.integers(0, 255, (hw[0] + k, hw[1] + k, 3), dtype=np.uint8)
        return [np.ascontiguousarray(base[i:i + hw[0], i:i + hw[1]]) for i in range(k)]
    from .sources import open_source

    src = open_source(cfg.images)
    out = []
    for f in src:
        out.append(f.image)
        if len(out) >= 16:
            break
    src.close()
    return out


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run and return the report (see module docstring)."""
    from .models.factory import create_model
    from .pipeline.resolve import resolve_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(resolve_device(cfg.device))
    model = create_model(cfg.model, device=device, seed=cfg.seed)
    if cfg.compile:  # the heaviest, shape-stable part
        from .engine.compiled import compile_encoder

        compile_encoder(model)
    if isinstance(cfg.size, str) and "x" in cfg.size:  # frames of exactly this size (224x224 = the square crop)
        frames_hw = tuple(int(v) for v in cfg.size.lower().split("x"))
        size = max(frames_hw)
    else:  # 4:3 frames for a long side
        size = int(cfg.size)
        frames_hw = (3 * size // 4, size)
    images = _frames(cfg, frames_hw, cfg.frames)
    engines = [StreamEngine(model, EngineConfig(size=size, precision=_PRECISION[cfg.dtype], heads=cfg.heads,
                                                  cuda_graphs=cfg.cuda_graphs))
               for _ in range(cfg.batch)]
    maps = [GlobalMap(MapConfig()) for _ in range(cfg.batch)]
    timer = _StageTimer(device)
    model = engines[0].model  # int8: the quantised copy the engines share
    model.stage_timer = timer if cfg.stage_timing else None
    # per-stage timings as float32 columns: 4 bytes per stage and frame, so a 10k-frame memory proof
    # measures the node, not the benchmark's own bookkeeping
    cols: dict[str, array] = {}
    mem: list[tuple[int, float, Optional[float]]] = []
    t_all = None
    total = cfg.warmup + cfg.frames
    for i in range(total):
        if i == cfg.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            t_all = time.perf_counter()
        timer.ms.clear()
        t0 = time.perf_counter()
        batch_frames = [Frame(image=images[(i + k) % len(images)], seq=i, stamp=i / 30) for k in range(cfg.batch)]
        results = process_batch(engines, batch_frames) if cfg.batch > 1 else [engines[0].process(batch_frames[0])]
        for r in results:
            if isinstance(r, Exception):
                raise r
        t1 = time.perf_counter()
        if cfg.with_map:
            for gm, r in zip(maps, results):
                gm.integrate(r.points_world_pose, r.colors, r.conf_cam, r.index)
        t2 = time.perf_counter()
        if i >= cfg.warmup:
            r0 = results[0]
            row = {"preprocess": sum(r.timings_ms["preprocess"] for r in results),
                   **dict(timer.ms), "postprocess": sum(r.timings_ms["postprocess"] for r in results),
                   "map": 1e3 * (t2 - t1), "total": 1e3 * (t2 - t0), "model": r0.timings_ms["model"] * cfg.batch}
            for k, v in row.items():
                cols.setdefault(k, array("f")).append(v)
        n = i - cfg.warmup + 1
        if n == 10 or (cfg.memory_every and n > 0 and n % cfg.memory_every == 0) or i == total - 1:
            dev = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
            mem.append((n, rss_mb(), dev))
    wall = time.perf_counter() - t_all
    model.stage_timer = None
    h, w = engines[0].last_hw
    flops = step_flops(model.cfg, h, w, cfg.batch)
    stages = {k: {"p50": round(float(np.percentile(np.asarray(v), 50)), 3),
                  "p99": round(float(np.percentile(np.asarray(v), 99)), 3)}
              for k, v in cols.items()}
    model_ms = sum(stages[k]["p50"] for k in ("encoder", "decoders", "memory", "heads") if k in stages) \
        or stages["model"]["p50"]
    report = {
        "config": asdict(cfg), "device": str(device), "model_input": [h, w],
        "params": sum(p.numel() for p in model.parameters()),
        "stages_ms": stages,
        "fps_per_stream": round(cfg.frames / wall, 3), "fps_aggregate": round(cfg.frames * cfg.batch / wall, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_device_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "memory": [{"frame": n, "rss_mb": round(r, 1), "device_mb": None if d is None else round(d, 1)} for n, r, d in mem],
        "gflop_per_step": round(flops["total"] / 1e9, 2),
        "gflop_by_stage": {k: round(v / 1e9, 2) for k, v in flops.items() if k != "total"},
        "achieved_tflops": round(flops["total"] / (model_ms / 1e3) / 1e12, 4) if model_ms else None,
        "threads": thread_report(),
        "cuda_graphs": _graph_stats(model) if cfg.cuda_graphs else None,
    }
    return report


def _graph_stats(model) -> Optional[dict]:
    from .engine.graphs import graphs_for

    g = graphs_for(model)
    return g.stats() if g is not None else None


def format_bench(rep: dict) -> str:
    lines = [f"{rep['config']['model']} at {rep['model_input'][0]}x{rep['model_input'][1]}, batch {rep['config']['batch']}, "
             f"{rep['config']['dtype']} on {rep['device']} ({rep['params'] / 1e6:.1f} M params)",
             f"{'stage':<12}{'p50 ms':>10}{'p99 ms':>10}"]
    for k, v in rep["stages_ms"].items():
        lines.append(f"{k:<12}{v['p50']:>10.2f}{v['p99']:>10.2f}")
    t = rep.get("threads") or {}
    if "torch_intra_op" in t:
        lines.append(f"threads: {t['torch_intra_op']} intra-op, {t['torch_inter_op']} inter-op, "
                     f"OMP_WAIT_POLICY={t['omp_wait_policy'] or 'unset'}")
    lines.append(f"fps: {rep['fps_per_stream']:.2f} per stream, {rep['fps_aggregate']:.2f} aggregate")
    lines.append(f"compute: {rep['gflop_per_step']} GFLOP/step, achieved {rep['achieved_tflops']} TFLOP/s")
    m = rep["memory"]
    device = f"; device peak {rep['peak_device_mb']} MB" if rep["peak_device_mb"] else ""
    lines.append(f"memory: RSS {m[0]['rss_mb']} MB at frame {m[0]['frame']} -> {m[-1]['rss_mb']} MB at frame "
                 f"{m[-1]['frame']}, peak {rep['peak_rss_mb']} MB{device}")
    return "\n".join(lines)


def save_report(rep: dict, path: Path) -> None:
    from .fileio import atomic_write_text

    atomic_write_text(path, json.dumps(rep, indent=1) + "\n")


def precision_drift(model, frames: list[np.ndarray], dtype: str = "bfloat16", size: Optional[int] = None) -> dict:
    """Normalised error (max|a-b| / max|b|) of low-precision autocast against float32 over a sequence.

    Both runs stream the same frames through their own engine (so the carried state drifts too);
    reported per output as the worst frame, plus the camera-centre error relative to the path length.
    """
    from .engine import default_size

    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"precision_drift compares bfloat16 or float16 with float32, got {dtype!r}")
    runs = {}
    for name, precision in (("fp32", "fp32"), (dtype, _PRECISION[dtype])):
        engine = StreamEngine(model, EngineConfig(size=size or default_size(model), precision=precision))
        runs[name] = [engine.process(Frame(image=f, seq=i, stamp=i / 30)) for i, f in enumerate(frames)]

    def nerr(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))

    ref, low = runs["fp32"], runs[dtype]
    out = {name: max(nerr(getattr(lo, name), getattr(r, name)) for lo, r in zip(low, ref))
           for name in ("points_cam", "points_world_head", "conf_cam", "depth")}
    centres_ref = np.stack([r.T_wc[:3, 3] for r in ref])
    centres_low = np.stack([r.T_wc[:3, 3] for r in low])
    path = float(np.linalg.norm(np.diff(centres_ref, axis=0), axis=1).sum())
    out["pose_translation_max_m"] = float(np.linalg.norm(centres_low - centres_ref, axis=1).max())
    out["pose_translation_pct_of_path"] = 100 * out["pose_translation_max_m"] / path if path > 0 else float("nan")
    rot = [np.degrees(np.arccos(np.clip((np.trace(r.T_wc[:3, :3].T @ lo.T_wc[:3, :3]) - 1) / 2, -1, 1)))
           for lo, r in zip(low, ref)]
    out["pose_rotation_max_deg"] = float(max(rot))
    out["frames"] = len(frames)
    return out
