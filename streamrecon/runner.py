"""``streamrecon run``: source -> engine -> global map -> sinks (files, Rerun), one frame at a time.

Bad frames are counted and reported, never fatal; Ctrl-C / SIGTERM stop the loop and every output is
still written (atomically). Outputs are also flushed every ``flush_every`` frames, so a killed run
leaves a usable trajectory behind.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional, TextIO

import numpy as np

from .engine import EngineConfig, StreamEngine, default_size
from .engine.stats import LatencyStats, device_peak_mb, peak_rss_mb, rss_mb
from .mapping import DEFAULT_CONF_THRESH, GlobalMap, MapConfig, model_conf_thresh
from .probe import ProbeSpec, parse_probe
from .sinks import OutputWriter
from .sources import FrameSource, open_source

__all__ = ["RunConfig", "run", "Progress", "format_summary"]

_logger = logging.getLogger(__name__)
MAX_CONSECUTIVE_ERRORS = 50


@dataclass
class RunConfig:
    """Settings of one run (CLI flags and YAML keys have the same names, ``-`` for ``_``)."""

    source: str = ""
    weights: Optional[str] = None
    size: Optional[int] = None
    device: str = "auto"
    conf_thresh: Optional[float] = None  # None: the model's recommendation (model_conf_thresh)
    stride: int = 1
    max_frames: int = 0
    output_dir: str = "outputs/run"
    viewer: str = "none"
    save_rrd: Optional[str] = None
    state_policy: str = "cut3r"
    reset_every: int = 0
    probe: list[str] = field(default_factory=list)
    save_frames: bool = False
    voxel_size: float = 0.02
    max_points: int = 2_000_000
    budget_policy: str = "coarsen"
    map_points: str = "pose"
    pixel_stride: int = 2
    repeat: int = 1
    fps: float = 30.0
    consolidate_every: int = 200
    flush_every: int = 100
    prefetch: Optional[bool] = None  # None: on when the model runs on a GPU (on a CPU the threads compete)
    fast_preprocess: bool = False
    precision: str = "fp32"
    progress: Optional[bool] = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting (before anything is loaded)."""
        if not self.source:
            raise ValueError("no source given (a folder, a video file, or a camera such as 0)")
        if self.viewer not in ("spawn", "web", "none"):
            raise ValueError(f"--viewer must be spawn, web or none, got {self.viewer!r}")
        if self.map_points not in ("pose", "head"):
            raise ValueError(f"--map-points must be 'pose' or 'head', got {self.map_points!r}")
        for name in ("stride", "repeat", "pixel_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("max_frames", "reset_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        EngineConfig(size=self.size or 512, policy=self.state_policy, reset_every=self.reset_every,
                     precision=self.precision)
        MapConfig(voxel_size=self.voxel_size, max_points=self.max_points, conf_thresh=model_conf_thresh(None, self.conf_thresh),
                  budget_policy=self.budget_policy, pixel_stride=self.pixel_stride)
        for p in self.probe:
            parse_probe(p)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


class Progress:
    """A one-line progress display: count/total, percent, live fps, ETA (files) or drops (live)."""

    def __init__(self, total: Optional[int], stream: TextIO = sys.stderr, enabled: bool = True) -> None:
        self.total, self.stream, self.enabled = total, stream, enabled
        self.start = self._last = time.monotonic()
        self._recent: list[float] = []

    def update(self, done: int, dropped: int = 0, errors: int = 0, force: bool = False) -> None:
        now = time.monotonic()
        self._recent = [t for t in self._recent if now - t < 5.0] + [now]
        if not self.enabled or (not force and now - self._last < 0.25):
            return
        self._last = now
        fps = (len(self._recent) - 1) / max(self._recent[-1] - self._recent[0], 1e-9) if len(self._recent) > 1 else 0.0
        if self.total:
            pct = 100.0 * done / self.total
            eta = (self.total - done) / fps if fps > 0 else float("nan")
            eta_s = f"{int(eta // 60)}:{int(eta % 60):02d}" if np.isfinite(eta) else "--:--"
            line = f"[{done:>{len(str(self.total))}}/{self.total}] {pct:5.1f}%  {fps:6.2f} fps  ETA {eta_s}"
        else:
            line = f"[{done}] {fps:6.2f} fps  dropped {dropped}"
        if errors:
            line += f"  errors {errors}"
        self.stream.write("\r" + line + "   ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class _StopFlag:
    """Set by SIGINT/SIGTERM (a second SIGINT interrupts at once)."""

    def __init__(self, on_stop: Callable[[], None]) -> None:
        self.set = False
        self.reason = ""
        self._on_stop = on_stop
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, _frame) -> None:
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set, self.reason = True, signal.Signals(signum).name
        _logger.warning("%s received: stopping after the current frame and writing outputs", self.reason)
        self._on_stop()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return name


def run(cfg: RunConfig, model=None, progress_stream: TextIO = sys.stderr,
        on_result: Optional[Callable] = None) -> dict:
    """Run a whole session and return its summary (also written to ``summary.json``).

    Args:
        cfg: settings; validated before anything is opened.
        model: an already loaded model (else ``cfg.weights`` is loaded).
        on_result: optional callback ``(FrameResult) -> None`` after each frame (tests, embedding).

    Raises:
        ValueError, FileNotFoundError, SourceError, CheckpointError: for inputs that cannot work at all
        (reported before any frame is processed).
    """
    cfg.validate()
    source: FrameSource = open_source(cfg.source, stride=cfg.stride, repeat=cfg.repeat, fps=cfg.fps)
    try:
        if model is None:
            from .checkpoint import load_model

            weights = cfg.weights
            if not weights:
                from .weights import bundled_weights

                weights = bundled_weights()
                if weights is None:
                    raise ValueError("no --weights given and this installation has no bundled model")
                _logger.warning("no --weights given: using the bundled model %s (trained on synthetic scenes)", weights.name)
            model = load_model(weights, device=_resolve_device(cfg.device))
        engine = StreamEngine(model, EngineConfig(size=cfg.size or default_size(model), policy=cfg.state_policy,
                                                  reset_every=cfg.reset_every, fast_preprocess=cfg.fast_preprocess,
                                                  precision=cfg.precision))
        conf_thresh = model_conf_thresh(model, cfg.conf_thresh)
        if cfg.conf_thresh is None and conf_thresh != DEFAULT_CONF_THRESH:
            _logger.info("map confidence threshold %.3g (recommended by the checkpoint)", conf_thresh)
        gmap = GlobalMap(MapConfig(voxel_size=cfg.voxel_size, max_points=cfg.max_points, conf_thresh=conf_thresh,
                                   budget_policy=cfg.budget_policy, pixel_stride=cfg.pixel_stride))
        writer = OutputWriter(cfg.output_dir, save_frames=cfg.save_frames)
        viewer = None
        if cfg.viewer != "none" or cfg.save_rrd:
            from .sinks.rerun_sink import RerunConfig, RerunSink

            viewer = RerunSink(RerunConfig(viewer=cfg.viewer, save_path=cfg.save_rrd,
                                           consolidate_every=cfg.consolidate_every))
    except BaseException:
        source.close()
        raise
    return _Loop(cfg, source, engine, gmap, writer, viewer, progress_stream, on_result).run()


class _Loop:
    def __init__(self, cfg: RunConfig, source: FrameSource, engine: StreamEngine, gmap: GlobalMap, writer: OutputWriter,
                 viewer, progress_stream: TextIO, on_result: Optional[Callable]) -> None:
        self.cfg, self.source, self.engine, self.gmap, self.writer, self.viewer = cfg, source, engine, gmap, writer, viewer
        self.on_result = on_result
        self.probes: list[ProbeSpec] = [parse_probe(p) for p in cfg.probe]
        self.stats = LatencyStats()
        self.errors: list[str] = []
        self.n_errors = 0
        self.processed = 0
        self.segments_seen = 0
        self.conf_max = 0.0
        self.prefetching = False
        self.empty_map_warned = False
        total = source.expected_frames()
        if cfg.max_frames and total:
            total = min(total, cfg.max_frames)
        show = cfg.progress if cfg.progress is not None else progress_stream.isatty()
        self.progress = Progress(total if not source.live else None, progress_stream, enabled=show)
        self.stop = _StopFlag(on_stop=source.close)
        self.rss_start: Optional[float] = None
        self.rss_samples: list[tuple[int, float]] = []

    def _record_error(self, message: str) -> None:
        self.n_errors += 1
        if len(self.errors) < 20:
            self.errors.append(message)
        _logger.warning(message)

    def run(self) -> dict:
        cfg = self.cfg
        self.stop.install()
        t_start = time.monotonic()
        consecutive = 0
        fatal = None
        prefetch = None
        use_prefetch = cfg.prefetch if cfg.prefetch is not None else self.engine.device.type == "cuda"
        self.prefetching = bool(use_prefetch and not self.source.live)
        if self.prefetching:  # read + preprocess frame t+1 while the model runs on t
            from .engine.prefetch import Prefetcher

            prefetch = Prefetcher(self.source, self.engine.prepare)
            items = iter(prefetch)
        else:
            items = ((f, None) for f in self.source)
        try:
            t_wait = time.perf_counter()
            for frame, prepared in items:
                source_ms = 1e3 * (time.perf_counter() - t_wait)
                if self.stop.set:
                    break
                try:
                    if isinstance(prepared, Exception):
                        raise prepared
                    result = self.engine.process(prepared if prepared is not None else frame)
                except Exception as e:  # a malformed frame must not stop the node
                    consecutive += 1
                    self._record_error(f"frame {frame.seq}: {e}")
                    if consecutive >= MAX_CONSECUTIVE_ERRORS:
                        fatal = f"{consecutive} frames in a row failed; last error: {e}"
                        break
                    t_wait = time.perf_counter()
                    continue
                consecutive = 0
                result.timings_ms["source"] = source_ms
                self._consume(result)
                self.processed += 1
                self.progress.update(self.processed, self.source.stats.dropped, self.n_errors + self.source.stats.errors)
                if cfg.max_frames and self.processed >= cfg.max_frames:
                    break
                if cfg.flush_every and self.processed % cfg.flush_every == 0:
                    self.writer.write_trajectory()
                    self.writer.write_summary(self.summary(time.monotonic() - t_start, interrupted=False))
                t_wait = time.perf_counter()
        except KeyboardInterrupt:
            self.stop.set, self.stop.reason = True, "SIGINT"
        finally:
            self.progress.close()
            self.source.close()
            if prefetch is not None:
                prefetch.close()
            self.stop.restore()
            try:
                self._run_probes(final=True)
            except Exception as e:  # probes must not cost the map and trajectory
                self._record_error(f"final probes failed: {e}")
            summary = self.summary(time.monotonic() - t_start, interrupted=self.stop.set, fatal=fatal)
            self.writer.write_all(self.gmap, summary)
            if self.viewer is not None:
                self.viewer.close()
        return summary

    def _consume(self, result) -> None:
        t0 = time.perf_counter()
        pts, conf = result.world_points(self.cfg.map_points)
        integ = self.gmap.integrate(pts, result.colors, conf, result.index)
        t1 = time.perf_counter()
        self._check_confidence(conf)
        self.writer.add_frame(result)
        t2 = time.perf_counter()
        result.timings_ms.update(map=1e3 * (t1 - t0), files=1e3 * (t2 - t1))
        if self.viewer is not None:
            metrics = {"fps": 1e3 / max(sum(result.timings_ms.values()), 1e-6), "map_points": len(self.gmap),
                       "conf_mean": float(result.conf_cam.mean()), "dropped": self.source.stats.dropped,
                       "latency_ms/total": sum(result.timings_ms.values())}
            self.viewer.log_frame(result, integ.new_points, integ.new_colors, metrics)
            if self.cfg.consolidate_every and (result.index + 1) % self.cfg.consolidate_every == 0:
                self.viewer.log_map(result.index, *self.gmap.points()[:2])
            result.timings_ms["viewer"] = 1e3 * (time.perf_counter() - t2)
        t3 = time.perf_counter()
        self._run_probes(final=False, index=result.index)
        if self.probes:
            result.timings_ms["probe"] = 1e3 * (time.perf_counter() - t3)
        self.stats.add(result.timings_ms)
        self.segments_seen = result.segment + 1
        if self.rss_start is None and result.index >= 10:
            self.rss_start = rss_mb()
        if result.index % 50 == 0:
            self.rss_samples.append((result.index, rss_mb()))
            del self.rss_samples[:-200]
        if self.on_result is not None:
            self.on_result(result)

    def _check_confidence(self, conf: np.ndarray) -> None:
        """Say once, after 10 frames, when the confidence filter has kept nothing at all."""
        self.conf_max = max(self.conf_max, float(np.nanmax(conf)) if conf.size else 0.0)
        if not self.empty_map_warned and self.processed >= 9 and len(self.gmap) == 0:
            self.empty_map_warned = True
            _logger.warning("the map is empty: no point had confidence above --conf-thresh %.2f in %d frames "
                            "(highest %.3f); lower --conf-thresh to keep points", self.gmap.cfg.conf_thresh,
                            self.processed + 1, self.conf_max)

    def _run_probes(self, final: bool, index: int = -1) -> None:
        if self.engine.last_T_wc is None:
            return
        for spec in self.probes:
            if (final and spec.at_end) or (not final and spec.due(index)):
                map_xyz = self.gmap.points()[0]
                for cam in spec.cameras(map_xyz, self.engine.last_T_wc):
                    probe = self.engine.probe(cam.T_wc, cam.K, cam.hw, name=cam.name)
                    self.writer.add_probe(probe)
                    if self.viewer is not None:
                        self.viewer.log_probe(probe)

    def summary(self, wall_s: float, interrupted: bool, fatal: Optional[str] = None) -> dict:
        src = self.source.stats
        total_ms = sum(v["mean"] for k, v in self.stats.summary().items() if k != "source")
        return {
            "source": self.cfg.source,
            "frames_in": src.read,
            "processed": self.processed,
            "dropped": src.dropped,
            "errors": self.n_errors + src.errors,
            "error_messages": self.errors + ([src.last_error] if src.last_error else []),
            "fps": round(self.processed / wall_s, 3) if wall_s > 0 else 0.0,
            "wall_s": round(wall_s, 3),
            "latency_ms": self.stats.summary(),
            "latency_ms_per_frame_mean": round(total_ms, 3),
            "memory_mb": {"peak_rss": round(peak_rss_mb(), 1), "rss_at_frame_10": self.rss_start,
                          "rss_now": round(rss_mb(), 1), "rss_samples": self.rss_samples,
                          "device_peak": device_peak_mb(self.engine.device)},
            "map": {**self.gmap.stats(), "confidence_max": round(self.conf_max, 4)},
            "segments": self.segments_seen,
            "prefetch": self.prefetching,
            "interrupted": interrupted,
            "stop_reason": self.stop.reason or ("fatal" if fatal else "end of source"),
            "fatal_error": fatal,
            "config": asdict(self.cfg),
            "model": {"head": self.engine.model.cfg.head_type, "size": self.engine.cfg.size,
                      "policy": self.engine.cfg.policy, "device": str(self.engine.device)},
        }


def format_summary(s: dict) -> str:
    """The one-screen end-of-run summary."""
    lines = [
        f"source      {s['source']}",
        f"frames      in {s['frames_in']}  processed {s['processed']}  dropped {s['dropped']}  errors {s['errors']}",
        f"speed       {s['fps']:.2f} fps over {s['wall_s']:.1f} s ({s['stop_reason']})",
        "latency ms  " + "  ".join(f"{k} {v['p50']:.1f}/{v['p99']:.1f}" for k, v in s["latency_ms"].items())
        + "  (p50/p99)",
        f"memory      peak RSS {s['memory_mb']['peak_rss']:.0f} MiB",
        f"map         {s['map']['points']} points, voxel {s['map']['voxel_size']:.4g}, segments {s['segments']}",
        f"outputs     {s['config']['output_dir']}: {', '.join(s.get('outputs', []))}",
    ]
    if s.get("error_messages"):
        lines.append("errors      " + "; ".join(s["error_messages"][:3]))
    if s.get("fatal_error"):
        lines.append(f"STOPPED     {s['fatal_error']}")
    return "\n".join(lines)
