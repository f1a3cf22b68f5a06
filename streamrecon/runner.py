"""``streamrecon run``: source -> :class:`StreamPipeline` (engine, map, sinks: files, Rerun), one frame at a time.

Bad frames are counted and reported, never fatal; Ctrl-C / SIGTERM stop the loop and every output is
still written (atomically). The trajectory is appended as frames arrive and flushed every
``flush_every`` frames with a running ``summary.json``, so a killed run leaves a usable trajectory.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO

import numpy as np

from .pipeline import LoadedModel, RunSummary, SourceCounts, StreamPipeline, build_pipeline, format_summary, load_resolved
from .probe import ProbeSpec, parse_probe
from .progress import shown
from .run_settings import RunConfig
from .settings import SettingsError
from .sinks.output_dir import claim_output_dir
from .sources import FrameSource, open_source

__all__ = ["RunConfig", "run", "Progress", "format_summary"]

_logger = logging.getLogger(__name__)
MAX_CONSECUTIVE_ERRORS = 50


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


def run(cfg: RunConfig, model=None, progress_stream: TextIO = sys.stderr,
        on_result: Optional[Callable] = None) -> RunSummary:
    """Run a whole session and return its summary (also written to ``summary.json``).

    Args:
        cfg: settings; validated before anything is opened.
        model: an already loaded model or :class:`LoadedModel` (else the settings' weights are loaded).
        on_result: optional callback ``(FrameResult) -> None`` after each frame (tests, embedding).

    Raises:
        SettingsError, FileNotFoundError, SourceError, CheckpointError: for inputs that cannot work at all
        (reported before any frame is processed).
    """
    cfg.validate()
    from pathlib import Path

    snap = None
    if cfg.resume or cfg.relocalise:  # read and verified before anything is opened
        from .snapshot import read_snapshot

        snap = read_snapshot(cfg.resume or cfg.relocalise)
    snapshot_dir = cfg.snapshot or (str(Path(cfg.pipeline.outputs.output_dir) / "snapshots")
                                    if cfg.pipeline.outputs.snapshot_every else None)
    claim = dict(overwrite=cfg.overwrite, resume_frames=int(snap.manifest.get("frames") or 0) if cfg.resume else None,
                 keep=[p for p in (cfg.source, cfg.resume, cfg.relocalise, snapshot_dir, cfg.pipeline.engine.weights) if p])
    out_dir = cfg.pipeline.outputs.output_dir
    claim_output_dir(out_dir, dry_run=True, **claim)  # refused before anything is opened
    source: FrameSource = open_source(cfg.source, stride=cfg.stride, repeat=cfg.repeat, fps=cfg.fps)
    holder: dict[str, Any] = {}
    try:
        loaded = LoadedModel.wrap(model) if model is not None else load_resolved(cfg.pipeline.engine)
        claim_output_dir(out_dir, **claim)  # the source opens and the model loads: now the earlier run goes
        single = source.expected_frames() == 1 and not source.live  # one photo: DUSt3R-style outputs
        if single:
            _logger.info("%s is a single image: writing its pointmap (frames/000000.npz) and pointmap.ply", cfg.source)
        pipeline = build_pipeline(cfg.pipeline, loaded, stream_id=cfg.source, on_result=on_result, single_image=single,
                                  describe={"source": cfg.source, "output_dir": cfg.pipeline.outputs.output_dir,
                                            "config": cfg.flat(), "checkpoint": loaded.info.describe()},
                                  snapshot_dir=snapshot_dir, snapshot_context=lambda: holder["loop"].position())
        pipeline.network_blocking = not source.live  # a camera never waits for the network
        skip = 0
        if cfg.resume:
            pipeline.restore(snap)
            skip = _frames_to_skip(cfg, source, snap.manifest)
        elif cfg.relocalise:
            pipeline.relocalise_in(snap)
        if cfg.revisit:
            source = _first_pass(cfg, source, pipeline)
    except BaseException:
        source.close()
        raise
    loop = _Loop(cfg, source, pipeline, progress_stream, skip=skip)
    holder["loop"] = loop
    return loop.run()


def _first_pass(cfg: RunConfig, source: FrameSource, pipeline: StreamPipeline) -> FrameSource:
    """``--revisit``'s first pass: every frame (``--max-frames`` of them) into the state, nothing written;
    then the engine is frozen and the source opened again for the pass that makes the outputs."""
    if source.live:
        raise SettingsError("--revisit needs a file source (an image folder or a video), not a camera")
    n = 0
    for frame in source:
        try:
            pipeline.engine.process(pipeline.prepare(frame))
        except Exception as e:  # counted in the second pass, which meets the same frame
            _logger.debug("revisit, first pass: frame %s: %s", frame.seq, e)
            continue
        n += 1
        if cfg.max_frames and n >= cfg.max_frames:
            break
    source.close()
    _logger.info("--revisit: %d frames read into the state; reading them again against it", n)
    pipeline.engine.revisit()
    return open_source(cfg.source, stride=cfg.stride, repeat=cfg.repeat, fps=cfg.fps)


def _source_path(spec: str) -> Optional[str]:
    """A file source's absolute path (how a resume recognises it, however it was spelled)."""
    from pathlib import Path

    p = Path(spec)
    return str(p.resolve()) if p.exists() else None


def _frames_to_skip(cfg: RunConfig, source: FrameSource, manifest: dict) -> int:
    """A resumed file source skips the frames the snapshot already took (same source, same stride)."""
    pos = manifest.get("source") or {}
    taken = int(pos.get("taken") or 0)
    if source.live or not taken:
        return 0
    same = pos.get("path") == _source_path(cfg.source) if pos.get("path") else pos.get("spec") == cfg.source
    if not same or pos.get("stride") != cfg.stride:
        _logger.warning("--resume: the snapshot was taken on %r (stride %s), this run reads %r (stride %d): "
                        "no frames are skipped", pos.get("spec"), pos.get("stride"), cfg.source, cfg.stride)
        return 0
    _logger.info("--resume: skipping the %d frames of %s the snapshot already took", taken, cfg.source)
    return taken


class _Loop:
    def __init__(self, cfg: RunConfig, source: FrameSource, pipeline: StreamPipeline, progress_stream: TextIO,
                 skip: int = 0) -> None:
        self.cfg, self.source, self.pipeline = cfg, source, pipeline
        self.skip = skip  # frames of the source a resumed run leaves out
        self.taken = skip  # frames taken from the source (with the skipped ones): the snapshot's position
        self.engine = pipeline.engine
        self.probes: list[ProbeSpec] = [parse_probe(p) for p in cfg.probe]
        self.prefetching = False
        total = source.expected_frames()
        if cfg.max_frames and total:
            total = min(total, cfg.max_frames)
        show = shown(cfg.progress, progress_stream)
        self.progress = Progress(total if not source.live else None, progress_stream, enabled=show)
        self.stop = _StopFlag(on_stop=source.close)

    def _extra(self) -> dict[str, Any]:
        e = self.engine
        return {"prefetch": self.prefetching,
                "model": {"head": e.model.cfg.head_type, "size": e.cfg.size, "policy": e.cfg.policy, "device": str(e.device)}}

    def position(self) -> dict[str, Any]:
        """Where the stream is in its source (recorded in each snapshot)."""
        return {"source": {"spec": self.cfg.source, "path": _source_path(self.cfg.source), "stride": self.cfg.stride,
                           "taken": self.taken, "live": bool(self.source.live)}}

    def _source_counts(self) -> SourceCounts:
        st = self.source.stats
        return SourceCounts(read=st.read, dropped=st.dropped, errors=st.errors, last_error=st.last_error or "")

    def run(self) -> RunSummary:
        cfg, pipe = self.cfg, self.pipeline
        self.stop.install()
        consecutive = 0
        fatal = None
        prefetch = None
        use_prefetch = cfg.prefetch if cfg.prefetch is not None else self.engine.device.type == "cuda"
        # (--network-every: the network's worker prepares its own frames; most frames are only tracked)
        self.prefetching = bool(use_prefetch and not self.source.live and pipe.network is None)
        if self.prefetching:  # read + preprocess frame t+1 while the model runs on t
            from .engine.prefetch import Prefetcher

            prefetch = Prefetcher(self.source, lambda f: self.engine.prepare(pipe.prepare(f)))
            items = iter(prefetch)
        else:
            items = ((f, None) for f in self.source)
        try:
            t_wait = time.perf_counter()
            skipping = self.skip
            for frame, prepared in items:
                if skipping:
                    skipping -= 1
                    t_wait = time.perf_counter()
                    continue
                source_ms = 1e3 * (time.perf_counter() - t_wait)
                if self.stop.set:
                    break
                self.taken += 1
                try:
                    if isinstance(prepared, Exception):
                        pipe.record_error(f"frame {frame.seq}: {prepared}")
                        raise prepared
                    pipe.push(prepared if prepared is not None else frame, source_ms=source_ms)
                except Exception as e:  # a malformed frame must not stop the node (already counted)
                    consecutive += 1
                    if consecutive >= MAX_CONSECUTIVE_ERRORS:
                        fatal = f"{consecutive} frames in a row failed; last error: {e}"
                        break
                    t_wait = time.perf_counter()
                    continue
                consecutive = 0
                self._run_probes(final=False, index=pipe.processed - 1)
                self.progress.update(pipe.processed, self.source.stats.dropped, pipe.n_errors + self.source.stats.errors)
                if cfg.max_frames and pipe.processed >= cfg.max_frames:
                    break
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
                pipe.record_error(f"final probes failed: {e}")
            summary = pipe.close(stop_reason=self.stop.reason or ("fatal" if fatal else "end of source"),
                                 interrupted=self.stop.set, fatal=fatal, source=self._source_counts(),
                                 extra=self._extra())
        return summary

    def _run_probes(self, final: bool, index: int = -1) -> None:
        if self.engine.last_T_wc is None:
            return
        for spec in self.probes:
            if (final and spec.at_end) or (not final and spec.due(index)):
                map_xyz = self.pipeline.gmap.points()[0]
                for cam in spec.cameras(map_xyz, self.engine.last_T_wc):
                    self.pipeline.probe(cam.T_wc, cam.K, cam.hw, name=cam.name)
