"""``streamrecon bench --precision A B ... --heads X Y``: the same frames through several precisions and
head sets in one invocation, with ratios and drift from that one run.

Two rates, measured separately:

* **network rate** (every variant): each variant has its own engine (its own recurrent state); frame
  ``i`` is stepped by every variant before frame ``i + 1``, the order rotating each frame, so the
  machine's drifts fall on all of them alike. Time = preprocess + model + postprocess.
* **pose rate** (``backend`` ``track`` / ``slam``): the whole pipeline (network, tracking, map; no
  files) of each variant over the same frames with ``network_every``, one after the other; poses per
  second and network frames per second of each over the frame loop (the drain of the network's last
  frames at the end is reported apart, ``drain_s``).

Drift is against the first variant (normally ``fp32`` / ``full``), frame by frame on the same inputs:
the worst frame's ``max|a - b| / max|b|`` of depth and world points (and the median pixel's
``|a - b| / |b|`` of depth), and the camera-centre (m, % of
the path) and rotation (deg) differences of the network's own poses. With a tracking backend also
``tracked_drift``: the same figures for the whole pipeline's tracked poses and fitted depth (the
network on every frame, the bundle adjustment in the frame loop, so only the precision differs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["SweepConfig", "run_sweep", "format_sweep"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    """Args:
        model: preset (random weights) or checkpoint path.
        images: a video or folder (its first ``frames`` frames, in order), or ``random``.
        network_frames: the network-rate part uses only the first this many (0: all ``frames``).
        size: model input long side (``None``: the model's own).
        precisions: ``fp32``, ``bf16``, ``fp16``, ``int8``.
        heads: ``full``, ``minimal``.
        backend: ``none`` (network rate only), ``track`` or ``slam`` (also the pose rate).
        network_every: ``--network-every`` for the pose-rate runs.
        intrinsics: known intrinsics for the pose-rate runs (``fx,fy,cx,cy``).
        ba_workers: ``--ba-worker`` values; with several, each pose-rate run is repeated per value
            (the first one fills the table's columns, every one is listed with its ratio).
        live: the pose-rate runs never wait for the network (a camera: a frame that finds it busy is
            only tracked); else they wait as a file source does.
    """

    model: str = "streamrecon_small"
    images: str = "random"
    size: Optional[int] = None
    frames: int = 20
    warmup: int = 2
    network_frames: int = 0
    precisions: tuple[str, ...] = ("fp32",)
    heads: tuple[str, ...] = ("full",)
    backend: str = "none"
    network_every: str = "1"
    intrinsics: Optional[str] = None
    live: bool = False
    ba_workers: tuple = ("auto",)
    threads: int = 0
    seed: int = 0
    device: str = "auto"
    variants: tuple[tuple[str, str], ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple((p, h) for p in self.precisions for h in self.heads))
        if not self.variants:
            raise ValueError("bench: give at least one --precision and one --heads")
        if self.frames < 2:
            raise ValueError("bench: --frames must be >= 2 for a sweep")


def _images(cfg: SweepConfig, hw: tuple[int, int]) -> list[np.ndarray]:
    if cfg.images == "random":
        rng = np.random.default_rng(cfg.seed)
        base = rng.integers(0, 255, (hw[0] + 32, hw[1] + 32, 3), dtype=np.uint8)
        return [np.ascontiguousarray(base[i:i + hw[0], i:i + hw[1]]) for i in range(cfg.frames)]
    from .sources import open_source

    src = open_source(cfg.images)
    out = []
    try:
        for f in src:
            out.append(f.image)
            if len(out) >= cfg.frames:
                break
    finally:
        src.close()
    if not out:
        raise ValueError(f"bench: no frames in {cfg.images}")
    return out


def _nerr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a[ok] - b[ok]).max() / max(np.abs(b[ok]).max(), 1e-12)) if ok.any() else float("nan")


def _drift(ref: list, other: list) -> dict:
    C_r = np.stack([r.T_wc[:3, 3] for r in ref])
    C_o = np.stack([r.T_wc[:3, 3] for r in other])
    path = float(np.linalg.norm(np.diff(C_r, axis=0), axis=1).sum())
    rot = [np.degrees(np.arccos(np.clip((np.trace(a.T_wc[:3, :3].T @ b.T_wc[:3, :3]) - 1) / 2, -1, 1)))
           for a, b in zip(ref, other)]
    t = float(np.linalg.norm(C_o - C_r, axis=1).max())
    rel = np.concatenate([(np.abs(o.depth - r.depth) / np.maximum(np.abs(r.depth), 1e-12)).ravel()
                          for r, o in zip(ref, other)])
    return {"depth": max(_nerr(o.depth, r.depth) for r, o in zip(ref, other)),
            "depth_median": float(np.nanmedian(rel)) if rel.size else float("nan"),
            "points_world": max(_nerr(o.points_world_pose, r.points_world_pose) for r, o in zip(ref, other)),
            "pose_m": t, "pose_pct_of_path": 100 * t / path if path > 0 else float("nan"), "pose_deg": float(max(rot))}


def _pipeline(cfg: SweepConfig, loaded, precision: str, heads: str, stream_id: str, network_every: str = "1",
              **slam):
    """A file-less pipeline of one variant with the sweep's tracking backend (``slam``: more
    :class:`SlamSettings` fields)."""
    from .pipeline import build_pipeline
    from .settings import EngineSettings, PipelineConfig, SlamSettings

    pc = PipelineConfig(engine=EngineSettings(precision=precision, heads=heads, network_every=network_every,
                                              size=str(cfg.size) if cfg.size else None, device=cfg.device),
                        slam=SlamSettings(backend=cfg.backend, intrinsics=cfg.intrinsics, **slam))
    pc.validate()
    return build_pipeline(pc, loaded, stream_id=stream_id, files=False)


def _pose_rate(cfg: SweepConfig, loaded, precision: str, heads: str, images: list[np.ndarray],
               ba_worker: str = "auto") -> dict:
    from .frames import Frame

    pipe = _pipeline(cfg, loaded, precision, heads, "bench", cfg.network_every, ba_worker=ba_worker)
    pipe.network_blocking = not cfg.live
    t0 = time.perf_counter()
    loop_s, net_done = 0.0, 0
    try:
        for i, im in enumerate(images):
            try:
                pipe.push(Frame(image=im, seq=i, stamp=i / 30))
            except Exception as e:  # counted by the pipeline; the benchmark goes on
                _logger.warning("bench: frame %d: %s", i, e)
        loop_s = time.perf_counter() - t0
        net_done = pipe.network.done if pipe.network is not None else pipe.processed
    finally:
        s = pipe.close()
    wall = time.perf_counter() - t0  # with the drain of the network's last frames
    net = s.network or {"frames": s.processed, "skipped_busy": 0}
    return {"poses_per_s": round(s.processed / loop_s, 3) if loop_s else 0.0,
            "network_per_s": round(net_done / loop_s, 3) if loop_s else 0.0,
            "network_frames": net["frames"], "frames": s.processed, "skipped_busy": net.get("skipped_busy", 0),
            "loop_s": round(loop_s, 3), "drain_s": round(wall - loop_s, 3),
            "track_ms_p50": s.slam.get("track_ms_p50"), "tracking_states": s.slam.get("states")}


def _tracked(cfg: SweepConfig, loaded, precision: str, heads: str, images: list[np.ndarray]) -> list:
    """The frames through the whole pipeline with tracking, the network on every frame and the bundle
    adjustment in the frame loop (``--deterministic``): what the tracked poses and fitted depth of a
    precision are, with no thread timing in them, to compare with the baseline's."""
    from .frames import Frame

    pipe = _pipeline(cfg, loaded, precision, heads, "bench-drift", deterministic=True)
    try:
        return [pipe.push(Frame(image=im, seq=i, stamp=i / 30)) for i, im in enumerate(images)]
    finally:
        pipe.close()


def run_sweep(cfg: SweepConfig) -> dict:
    """Run every variant on the same frames; returns the report (see the module docstring)."""
    import torch

    from .engine import EngineConfig, Frame, StreamEngine, default_size
    from .models.factory import create_model
    from .pipeline import LoadedModel
    from .pipeline.resolve import resolve_device

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    info = None
    if Path(cfg.model).suffix in (".pth", ".safetensors", ".pt"):  # with its metadata (the map's conf_thresh)
        from .checkpoint import load_model_info

        model, info = load_model_info(cfg.model, device=device)
    else:
        model = create_model(cfg.model, device=device, seed=cfg.seed)
    size = cfg.size or default_size(model)
    hw = (size, size) if size == 224 else (3 * size // 4, size)
    all_images = _images(cfg, hw)
    images = all_images[:cfg.network_frames] if cfg.network_frames else all_images
    n = len(images)
    engines = {v: StreamEngine(model, EngineConfig(size=size, precision=v[0], heads=v[1])) for v in cfg.variants}
    ms: dict = {v: [] for v in cfg.variants}
    results: dict = {v: [] for v in cfg.variants}
    rounds = cfg.warmup + n
    for i in range(rounds):
        k = i % len(cfg.variants)
        for v in cfg.variants[k:] + cfg.variants[:k]:  # rotate who goes first
            im = images[i % n] if i >= cfg.warmup else images[0]
            t0 = time.perf_counter()
            r = engines[v].process(Frame(image=im, seq=i, stamp=i / 30))
            dt = 1e3 * (time.perf_counter() - t0)
            if i >= cfg.warmup:
                ms[v].append(dt)
                results[v].append(r)
            elif i == cfg.warmup - 1:  # warm-up frames moved the state: start every variant afresh
                engines[v] = StreamEngine(model, EngineConfig(size=size, precision=v[0], heads=v[1]))
    base = cfg.variants[0]
    rows = []
    for v in cfg.variants:
        a = np.asarray(ms[v])
        row = {"precision": v[0], "heads": v[1], "ms_p50": round(float(np.median(a)), 2),
               "ms_mean": round(float(a.mean()), 2), "network_fps": round(1e3 / float(a.mean()), 3),
               "time_ratio": round(float(np.median(a) / np.median(ms[base])), 4),
               "speedup": round(float(np.median(ms[base]) / np.median(a)), 4)}
        if v != base:
            row["drift"] = {k: round(x, 6) for k, x in _drift(results[base], results[v]).items()}
        rows.append(row)
    report = {"model": cfg.model, "images": cfg.images, "frames": n, "model_input": list(engines[base].last_hw),
              "device": device, "threads": torch.get_num_threads(), "baseline": {"precision": base[0], "heads": base[1]},
              "variants": rows}
    if cfg.backend != "none":
        loaded = LoadedModel.wrap(model, info)
        workers = tuple(dict.fromkeys(cfg.ba_workers)) or ("auto",)
        for row in rows:
            by = {w: _pose_rate(cfg, loaded, row["precision"], row["heads"], all_images, ba_worker=w) for w in workers}
            row["pipeline"] = by[workers[0]]
            if len(workers) > 1:
                row["pipeline_by_ba_worker"] = by
        if len(rows) > 1:  # tracked poses and fitted depth of each variant against the baseline's
            tracked = {v: _tracked(cfg, loaded, v[0], v[1], images) for v in cfg.variants}
            for v, row in zip(cfg.variants, rows):
                if v != base:
                    row["tracked_drift"] = {k: round(x, 6) for k, x in _drift(tracked[base], tracked[v]).items()}
        report["pipeline"] = {"backend": cfg.backend, "network_every": cfg.network_every, "live": cfg.live,
                              "ba_workers": list(workers)}
    return report


def format_sweep(rep: dict) -> str:
    b = rep["baseline"]
    lines = [f"{rep['model']} at {rep['model_input'][0]}x{rep['model_input'][1]} on {rep['device']} "
             f"({rep['threads']} threads), {rep['frames']} frames of {rep['images']}; ratios against "
             f"{b['precision']}/{b['heads']}, from this run",
             f"{'precision':<10}{'heads':<9}{'ms p50':>9}{'net fps':>9}{'speedup':>9}{'depth %':>9}{'points %':>9}"
             f"{'pose cm':>9}{'pose deg':>9}" + (f"{'poses/s':>9}{'net/s':>8}" if "pipeline" in rep else "")]
    for r in rep["variants"]:
        d = r.get("drift")
        drift = (f"{100 * d['depth']:>9.2f}{100 * d['points_world']:>9.2f}{100 * d['pose_m']:>9.2f}{d['pose_deg']:>9.3f}"
                 if d else f"{'-':>9}{'-':>9}{'-':>9}{'-':>9}")
        p = r.get("pipeline")
        rate = f"{p['poses_per_s']:>9.2f}{p['network_per_s']:>8.2f}" if p else ""
        lines.append(f"{r['precision']:<10}{r['heads']:<9}{r['ms_p50']:>9.1f}{r['network_fps']:>9.2f}"
                     f"{r['speedup']:>9.3f}{drift}{rate}")
    for r in rep["variants"]:
        by = r.get("pipeline_by_ba_worker")
        if by:
            first = next(iter(by.values()))["poses_per_s"] or float("nan")
            lines.append(f"  {r['precision']}/{r['heads']} poses/s by --ba-worker: " + ", ".join(
                f"{w} {p['poses_per_s']:.2f} (x{p['poses_per_s'] / first:.2f}, net/s {p['network_per_s']:.2f})"
                for w, p in by.items()))
    for r in rep["variants"]:
        d = r.get("tracked_drift")
        if d:
            lines.append(f"  {r['precision']}/{r['heads']} tracked (--backend {rep['pipeline']['backend']}, the network on "
                         f"every frame, deterministic): depth {100 * d['depth']:.2f} % (median pixel "
                         f"{100 * d['depth_median']:.2f} %), points "
                         f"{100 * d['points_world']:.2f} %, pose {100 * d['pose_m']:.2f} cm / {d['pose_deg']:.3f} deg")
    if "pipeline" in rep:
        pl = rep["pipeline"]
        lines.append(f"poses/s, net/s: the whole pipeline (--backend {pl['backend']}, --network-every "
                     f"{pl['network_every']}{', live: never waiting for the network' if pl['live'] else ''}) "
                     "over the same frames")
    return "\n".join(lines)
