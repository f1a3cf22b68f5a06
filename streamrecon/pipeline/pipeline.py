"""``StreamPipeline``: the only code between a :class:`StreamEngine` and the outside world.

One pipeline per stream (``run`` has one; ``serve`` one per ``stream_id``)::

    Frame --prepare--> engine --FrameResult--> consume: [masks] geometry stage [masks] --> map, trajectory --FrameEvent--> sinks
    (serve: the node prepares frames, steps many engines in one batch, then calls consume(result) for each)

The geometry stage (:class:`~streamrecon.slam.GeometryStage`, optional) undistorts frames and
attaches known intrinsics before the engine, and after it replaces the network's pose and
pointmaps with tracked ones (``--backend track``) before anything reaches the map. The dynamic-object
masker (:class:`~streamrecon.dynamic.DynamicMasker`, ``--dynamic-mask``, optional) marks moving pixels
before the stage (attention, flow: kept out of tracking too) or after it (residual); the map takes only
the unmasked pixels.

The pipeline owns the map, the trajectory, the counters and the timings (in its own structure: the
engine's ``FrameResult`` is never modified) and hands frozen events to its sinks. ``close()`` sends
the final :class:`StreamClosed` to every sink and returns the :class:`RunSummary`.
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..engine.stats import LatencyStats, device_peak_mb, peak_rss_mb, rss_mb
from ..frames import Frame, FrameResult, ProbeResult
from ..mapping import GlobalMap
from ..sinks.base import BackgroundSink, FrameEvent, Sink, StreamClosed, preview_image
from ..threads import report as thread_report
from .summary import RunSummary, SourceCounts
from .trajectory import Trajectory

__all__ = ["StreamPipeline", "PipelineOptions", "AUTO_MAX_GAP"]

_logger = logging.getLogger(__name__)

#: ``--network-every auto``: the network sees keyframes, and at least every this many frames
AUTO_MAX_GAP = 10
#: --network-every: consecutive network failures after which every frame fails (and the run stops)
NETWORK_FAILURES_FATAL = 20


@dataclass(frozen=True)
class _Integrated:
    new_points: np.ndarray
    new_colors: np.ndarray


@dataclass(frozen=True)
class PipelineOptions:
    """Args:
        stream_id: the stream's name (``run``: the source).
        map_points: ``pose`` (``T_wc`` x camera pointmap) or ``head`` (the model's world head).
        consolidate_every: hand the whole map to the sinks every N frames (0 = never).
        flush_every: hand a running summary to the sinks every N frames (0 = never).
        flush_every_s: ... and at least every this many seconds (0 = by frames only).
        map_every_s: hand the whole map to the sinks every this many seconds (0 = only at the end).
        describe: static facts for the summary (settings, model), passed through.
    """

    stream_id: str = ""
    map_points: str = "pose"
    consolidate_every: int = 200
    flush_every: int = 100
    flush_every_s: float = 0.0
    map_every_s: float = 0.0
    describe: dict[str, Any] = field(default_factory=dict)


class StreamPipeline:
    """Args:
        engine: the stream's :class:`~streamrecon.engine.StreamEngine` (owns the model state).
        gmap: its global map.
        sinks: where results go (files, viewer, publisher); order is kept.
        options: see :class:`PipelineOptions`.
        on_result: optional callback ``(FrameResult) -> None`` after each frame (tests, embedding).
    """

    def __init__(self, engine, gmap: GlobalMap, sinks: Sequence[Sink] = (), options: PipelineOptions = PipelineOptions(),
                 on_result: Optional[Callable[[FrameResult], None]] = None, stage=None, masker=None) -> None:
        self.engine, self.gmap, self.sinks, self.opt = engine, gmap, list(sinks), options
        self.stage = stage if stage is not None and stage.active else None
        self.masker = masker
        if self.stage is not None and masker is not None:
            # the residual cue needs the final pose, and the keyframe clouds must not take what it masks
            self.stage.after_pose = self._residual_mask
        self.on_result = on_result
        self.trajectory = Trajectory()
        self.stats = LatencyStats()
        self.processed = 0
        self.n_errors = 0
        self.errors: list[str] = []
        self.k_given = 0
        self.segments_seen = 0
        self.conf_max = 0.0
        self.empty_map_warned = False
        self.rss_start: Optional[float] = None
        self.rss_samples: list[tuple[int, float]] = []
        self.started = time.monotonic()
        self._recent: list[float] = []
        self.closed: Optional[RunSummary] = None
        self.sink_ms_total = 0.0  # loop-thread time spent handing results to sinks
        self.map_rebuilds = 0
        self.refine_stats: Optional[dict] = None
        # after close: "optimized" (every frame moved with its keyframe after the last loop closure),
        # "refined" (--refine), (F, 4, 4) T_wc each
        self.final_poses: dict[str, np.ndarray] = {}  # maps swapped in after a loop closure
        loop = getattr(self.stage, "loop", None) if self.stage is not None else None
        closes = loop is not None and loop.cfg.rebuild_map and loop.map_factory is not None
        # with loop closure: the last frames' map points (strided, confident; their epoch and index),
        # re-integrated into a map rebuilt from keyframes
        self._since_kf: deque = deque(maxlen=64 if closes else 0)
        self._map_epoch = 0  # the loop-closure epoch the map is in
        self._rows = array("q")  # result.index of every trajectory row
        self._row_epochs = array("i")  # the loop-closure epoch each row was emitted in
        self.snapshots = None  # a streamrecon.snapshot.Snapshotter: periodic and final snapshots
        self._unlocalised: deque = deque(maxlen=256)  # --relocalise: map chunks of frames not localised yet
        self.unlocalised_dropped = 0  # frames seen before the relocalisation that never reach the map (the buffer is full)
        self.restored_frames = 0  # frames a resumed stream brought from its snapshot
        self._resend_map = False  # hand the whole map to the viewer with the next frame
        self._last_flush = self._last_map = time.monotonic()
        self._wants_image = any(getattr(getattr(s, "inner", s), "wants_image", False) for s in self.sinks)
        self._unflushed = 0  # frames since the last periodic summary
        self._map_dirty = False  # frames since the last periodic map
        # --network-every: the network on a worker thread, every frame tracked (see start_network)
        self.network = None  # a NetworkWorker
        self.network_every: "int | str" = 1
        self.network_blocking = True  # lossless sources wait for the network; live ones skip it when busy
        self._records: dict = {}  # pipeline index -> PoseRecord of frames whose network result is pending
        self._next_index = 0
        self._since_network = 0  # frames since the last one given to the network
        self._template: Optional[FrameResult] = None  # the newest network result (crop, principal point)
        self._dense_pending: list = []  # network results taken but not yet handed on (a frame failed)
        self._held_keyframe: Optional[tuple] = None  # (index, frame, record) of a keyframe the busy network missed
        self.keyframes_replaced = 0  # held keyframes replaced by a newer one before the network was free
        self._network_failures = 0  # consecutive network failures
        self._conf_mean = 0.0

    # ------------------------------------------------------------------------------------------

    def _residual_mask(self, r: FrameResult) -> FrameResult:
        """The stage's hook between the pose and the keyframe: the residual cue against the current map
        (not while a relocalising stream's world is provisional: the map is the saved one's)."""
        if self.stage.localised is False:
            return self.masker.after_stage(r, None)
        return self.masker.after_stage(r, self.gmap)

    def record_error(self, message: str) -> None:
        """Count a frame that could not be used (kept: the first 20 messages)."""
        self.n_errors += 1
        if len(self.errors) < 20:
            self.errors.append(message)
        _logger.warning("%s%s", f"stream {self.opt.stream_id}: " if self.opt.stream_id else "", message)

    def prepare(self, frame: Frame) -> Frame:
        """The frame as the engine should see it (undistorted, known intrinsics attached)."""
        return self.stage.prepare(frame) if self.stage is not None else frame

    def push(self, frame: Frame, source_ms: float = 0.0) -> FrameResult:
        """Process one frame of this stream: prepare, engine step, then :meth:`consume`.

        Returns the result as it entered the map (with the geometry stage's pose and pointmaps).

        Raises:
            Exception: whatever made the frame unusable (already counted by :meth:`record_error`).
        """
        if self.network is not None:
            with self.stage.tracker.busy():  # local BA computes only where this frame waits (tracker.busy)
                return self._push_async(frame, source_ms)
        try:
            frame = self.prepare(frame) if isinstance(frame, Frame) else frame
            result = self.engine.process(frame)
        except Exception as e:
            self.record_error(f"frame {getattr(frame, 'seq', '?')}: {e}")
            raise
        return self.consume(result, source_ms=source_ms, frame=frame if isinstance(frame, Frame) else
                            getattr(frame, "frame", None))

    # ------------------------------------------------------------------------------------------ --network-every

    def start_network(self, every: "int | str", inline: bool = False) -> None:
        """Run the network on a worker thread and track every frame (``--network-every``): ``every`` is
        ``N`` (every N-th frame) or ``"auto"`` (keyframes, and at least every :data:`AUTO_MAX_GAP`
        frames); ``inline``: the network runs in the frame loop, its result arriving at the next frame
        (deterministic). Call before the first frame; needs the tracking backend."""
        from .network_worker import NetworkWorker

        if self.stage is None or self.stage.tracker is None:
            raise ValueError("--network-every needs the tracking backend (--backend track or slam)")
        if self.processed:
            raise RuntimeError("start_network() must come before the first frame")
        self.network_every = every
        self.network = NetworkWorker(self.engine, depth=1, inline=inline)

    def _wants_network(self, r: FrameResult) -> bool:
        """Keyframes (their pixels are what the loop closer stores) and lost frames always; otherwise
        ``N`` frames after the last frame the network took (``auto``: :data:`AUTO_MAX_GAP`). Counting
        from the last one taken, not by index, keeps a live source that just missed a slot from
        waiting a whole period for the next."""
        if r.tracking is not None and (r.tracking.keyframe or r.tracking.state == "lost"):
            return True
        gap = AUTO_MAX_GAP if self.network_every == "auto" else int(self.network_every)
        return self._since_network + 1 >= gap

    def _take_network(self) -> list[FrameResult]:
        """The network results that arrived, as the stage makes them (tracked pose, its scale)."""
        out = []
        for d in self.network.poll():
            rec = self._records.pop(d.index, None)
            if d.error is not None:
                self.record_error(f"frame {d.index}: network: {d.error}")
                self._network_failures += 1
                continue
            self._network_failures = 0
            if rec is None:
                continue
            try:
                out.append(self.stage.process_dense(d.result, rec))
            except Exception as e:  # the pose was published; only this frame's pixels are lost
                self.record_error(f"frame {d.index}: network result: {type(e).__name__}: {e}")
        if out:
            self._template = out[-1]
        return out

    def _submit(self, index: int, frame: Frame, rec, block: bool) -> bool:
        if block and self.network.full:  # the frame loop will wait for the network: the local BA may run
            with self.stage.tracker.waiting():
                taken = self.network.submit(index, frame, block=True)
        else:
            taken = self.network.submit(index, frame, block=block)
        if taken:
            self._records[index] = rec
            self._since_network = -1
            return True
        return False

    def _push_async(self, frame, source_ms: float) -> FrameResult:
        from ..engine.engine import validate_frame

        if not isinstance(frame, Frame):  # prefetched (runner): the worker prepares its own frames
            frame = getattr(frame, "frame", frame)
        try:
            frame = self.prepare(frame)
            validate_frame(frame)
        except Exception as e:
            msg = str(e)
            self.record_error(msg if msg.startswith("frame ") else f"frame {getattr(frame, 'seq', '?')}: {msg}")
            raise
        t0 = time.perf_counter()
        self.stage.poll()  # loop-closure corrections reach the tracker, the prior and pending frames now
        # network results that arrived (kept until a frame succeeds: a frame that fails to track
        # does not lose them)
        self._dense_pending.extend(self._take_network())
        if self._network_failures >= NETWORK_FAILURES_FATAL:
            # a broken model or device ends the run (the runner stops after enough failed frames)
            # instead of tracking forever on a stale depth prior
            msg = f"frame {frame.seq}: the network failed on the last {self._network_failures} frames it was given"
            self.record_error(msg)
            raise RuntimeError(msg)
        dense = self._dense_pending
        index = self._next_index
        own = None
        if self._template is None:  # nothing to track against yet: this frame waits for the network
            with self.stage.tracker.waiting():
                self.network.submit(index, frame, block=True)
                self.network.wait()
            for d in self.network.poll():
                if d.index == index:
                    own = d
            if own.error is not None:
                self.record_error(f"frame {frame.seq}: {own.error}")
                raise own.error
        net_ms = 1e3 * (time.perf_counter() - t0)
        try:
            if own is not None:
                result = self.stage.process(replace(own.result, index=index), frame)
                self._template = result
            else:
                result, rec = self.stage.track_only(frame, index, self._template)
                held = self._held_keyframe
                if held is not None and self._submit(*held, block=False):  # an older keyframe first (frame order)
                    held = self._held_keyframe = None
                if self._wants_network(result):
                    if held is None and self._submit(index, frame, rec, block=self.network_blocking):
                        pass
                    elif rec.keyframe is not None:
                        # a live source's keyframe met a busy network: it waits for the next free slot
                        # (the newest keyframe wins) instead of never reaching the loop closer
                        self.keyframes_replaced += held is not None
                        self._held_keyframe = (index, frame, rec)
        except Exception as e:
            self.record_error(f"frame {frame.seq}: {type(e).__name__}: {e}")
            raise
        self._dense_pending = []
        self._next_index += 1
        self._since_network += 1
        return self.consume(result, source_ms=source_ms, frame=frame, dense=dense, staged=True,
                            stage_ms=1e3 * (time.perf_counter() - t0) - net_ms)

    def network_stats(self) -> dict[str, Any]:
        """``--network-every``: the network's frames and rate beside the pose rate (empty without it)."""
        if self.network is None:
            return {}
        wall = time.monotonic() - self.started
        return {"every": self.network_every, "poses_per_s": round((self.processed - self.restored_frames) / wall, 3)
                if wall > 0 else 0.0, **self.network.stats(self.processed, wall),
                "pending": len(self._records), "blocking": self.network_blocking,
                "keyframes_held_replaced": self.keyframes_replaced}

    def _drain_network(self, timeout: float) -> list[FrameResult]:
        """End of stream: wait for the frames the network still has, put them in the map."""
        if self.network is None:
            return []
        if self._held_keyframe is not None:  # a keyframe still waiting for a free network slot
            self._submit(*self._held_keyframe, block=True)
            self._held_keyframe = None
        self.network.close(timeout)
        dense = self._dense_pending + self._take_network()
        self._dense_pending = []
        for d in dense:
            self._integrate_dense(d)
        return dense

    def _integrate_dense(self, d: FrameResult):
        pts, conf = d.world_points(self.opt.map_points, static_only=True)
        integ = self.gmap.integrate(pts, d.colors, conf, d.index)
        if self._since_kf.maxlen:
            self._since_kf.append(self._map_chunk(d))
        self._check_confidence(conf)
        self._conf_mean = float(d.conf_cam.mean()) if d.conf_cam.size else self._conf_mean
        return integ

    def consume(self, result: FrameResult, source_ms: float = 0.0, context: Optional[dict] = None,
                frame: Optional[Frame] = None, dense: Sequence[FrameResult] = (), staged: bool = False,
                stage_ms: float = 0.0) -> FrameResult:
        """Run the geometry stage on a result the engine produced (here or in a batch), integrate it
        and hand it to the sinks. ``frame`` is the prepared frame (the tracker needs its image).
        ``--network-every``: ``staged`` (the stage already made ``result``, maybe pose-only) and
        ``dense``, network results that arrived since the last frame."""
        t_stage = time.perf_counter()
        swapped, loop = False, None
        mask_ms0 = self.masker.ms if self.masker is not None else 0.0
        if self.masker is not None:
            result = self.masker.before_stage(result, frame)
        if self.stage is not None:
            if not staged:
                result = self.stage.process(result, frame)
            swapped = self._swap_map()
            if self.stage.just_localised:  # the map is the saved one: in the world the stream just moved to
                self.stage.just_localised = False
                self._map_epoch = self.stage.epoch
            loop = self.stage.take_loop() if getattr(self.stage, "loop", None) is not None else None
        elif self.masker is not None:  # with a stage, it runs the residual cue itself (before its keyframes)
            result = self.masker.after_stage(result, self.gmap)
        mask_ms = self.masker.ms - mask_ms0 if self.masker is not None else 0.0
        stage_ms += 1e3 * (time.perf_counter() - t_stage) - mask_ms
        t0 = time.perf_counter()
        if staged:  # --network-every: the pixels are the network results that arrived
            new_pts, new_col = [], []
            for d in ((result,) if result.network else ()) + tuple(dense):
                integ = self._integrate_dense(d)
                new_pts.append(integ.new_points)
                new_col.append(integ.new_colors)
            integ = _Integrated(np.concatenate(new_pts) if new_pts else np.zeros((0, 3), np.float32),
                                np.concatenate(new_col) if new_col else np.zeros((0, 3), np.uint8))
            conf = result.conf_cam
        else:
            pts, conf = result.world_points(self.opt.map_points, static_only=True)
            if self.stage is not None and self.stage.localised is False:  # a provisional world: kept aside
                if len(self._unlocalised) == self._unlocalised.maxlen:
                    self.unlocalised_dropped += 1
                self._unlocalised.append(self._map_chunk(result))
                integ = self.gmap.integrate(pts[:0], result.colors[:0], conf[:0], result.index)
            else:
                if self._unlocalised:
                    self._integrate_unlocalised()
                integ = self.gmap.integrate(pts, result.colors, conf, result.index)
            if self._since_kf.maxlen:
                self._since_kf.append(self._map_chunk(result))
            self._check_confidence(conf)
            self._conf_mean = float(result.conf_cam.mean()) if result.conf_cam.size else self._conf_mean
        self.trajectory.append(result.stamp, result.T_wc)
        self._rows.append(result.index)
        self._row_epochs.append(getattr(self.stage, "epoch", 0) if self.stage is not None else 0)
        self.processed += 1
        self.segments_seen = result.segment + 1
        if result.K_given is not None:
            self.k_given += 1
        t1 = time.perf_counter()
        n = self.processed
        snapshot = None
        viewer = self._wants_snapshot()  # a viewer sink gets the whole map now and then, and the frame itself
        resend, self._resend_map = self._resend_map, False  # a resumed / relocalised map: shown at once
        if (swapped or resend or (self.opt.consolidate_every and n % self.opt.consolidate_every == 0)) and viewer:
            snapshot = self.gmap.points()[:2]
        self._unflushed += 1
        self._map_dirty = True
        summary, map_files = self._periodic(by_frames=bool(self.opt.flush_every and n % self.opt.flush_every == 0))
        now = time.monotonic()
        self._recent = [t for t in self._recent[-49:] if now - t < 5.0] + [now]
        engine_ms = sum(result.timings_ms.values())
        preview = preview_image(frame.image) if frame is not None and viewer else None
        event = FrameEvent(
            stream_id=self.opt.stream_id, result=result, new_points=integ.new_points, new_colors=integ.new_colors,
            map_points=len(self.gmap), summary=summary, context=dict(context or {}), map_snapshot=snapshot, loop=loop,
            preview=preview, map_files=map_files,
            image=frame.image if frame is not None and self._wants_image else None, dense=tuple(dense),
            metrics={"fps": self.fps(), "map_points": len(self.gmap), "conf_mean": self._conf_mean,
                     "latency_ms/total": engine_ms + source_ms + 1e3 * (t1 - t0),
                     **({"network_fps": self.network_stats()["network_fps"]} if self.network is not None else {})})
        for sink in self.sinks:
            try:
                sink.on_frame(event)
            except Exception as e:  # a sink that fails must not stop the stream
                self._sink_error(sink, e)
        t2 = time.perf_counter()
        self.sink_ms_total += 1e3 * (t2 - t1)
        timings = {"source": source_ms, **result.timings_ms, "map": 1e3 * (t1 - t0), "sinks": 1e3 * (t2 - t1)}
        if self.stage is not None:
            timings["geometry"] = stage_ms
        if self.masker is not None:
            timings["dynamic_mask"] = mask_ms
        timings["frame"] = sum(v for k, v in timings.items() if k != "source")  # the frame loop's own time
        self.stats.add(timings)
        if self.rss_start is None and result.index >= 10:
            self.rss_start = rss_mb()
        if result.index % 50 == 0:
            self.rss_samples.append((result.index, rss_mb()))
            del self.rss_samples[:-200]
        if self.snapshots is not None and self.snapshots.due(self.processed):
            try:
                self.snapshots.submit(self)
            except Exception as e:  # the stream goes on; the previous snapshot is kept
                self.record_error(f"snapshot: {type(e).__name__}: {e}")
        if self.on_result is not None:
            self.on_result(result)
        return result

    # ------------------------------------------------------------------------------------------ snapshots

    def _periodic(self, by_frames: bool = False) -> tuple[Optional[dict], Optional[tuple]]:
        """``(running summary, map files)`` when due (else ``None`` each): the summary every
        ``flush_every`` frames (``by_frames``) or ``flush_every_s`` seconds, the whole map every
        ``map_every_s`` seconds (with a summary); only when frames came since the last one."""
        now = time.monotonic()
        map_files = None
        if self.opt.map_every_s and self._map_dirty and now - self._last_map >= self.opt.map_every_s:
            self._last_map, self._map_dirty = now, False
            map_files = (*self.gmap.points(), self.trajectory.arrays()[1])
        if not (by_frames or map_files is not None or (self.opt.flush_every_s and self._unflushed
                                                       and now - self._last_flush >= self.opt.flush_every_s)):
            return None, None
        self._last_flush, self._unflushed = now, 0
        return self.summary(stop_reason="running").to_dict(), map_files

    def flush_if_due(self) -> bool:
        """Between frames (``serve``: a stream that paused): the periodic flush and map when due, without
        waiting for a frame, so a kill loses at most ``flush_every_s`` seconds. Returns whether it flushed."""
        if self.closed is not None:
            return False
        summary, map_files = self._periodic()
        if summary is None:
            return False
        self._tell_sinks("on_flush", summary, map_files)
        return True

    def _tell_sinks(self, method: str, *args) -> None:
        """Call ``method`` on every sink that has it (optional sink methods); a failing sink is counted."""
        for sink in self.sinks:
            fn = getattr(sink, method, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception as e:
                    self._sink_error(sink, e)

    def restore(self, data) -> None:
        """Continue from a verified snapshot (:func:`streamrecon.snapshot.read_snapshot`); call before the
        first frame. Everything is replaced, or nothing (:class:`~streamrecon.snapshot.SnapshotError`). The
        sinks that keep files get the restored trajectory (``trajectory.txt`` holds every frame)."""
        from ..snapshot.state import restore

        if self.processed:
            raise RuntimeError("restore() must come before the first frame")
        restore(self, data)
        self.restored_frames = self.processed
        self._resend_map = True
        self._tell_sinks("on_resume", *self.trajectory.arrays())

    def discard(self) -> None:
        """Stop this pipeline's threads without writing any output (a stream whose restore failed)."""
        for sink in self.sinks:
            stop = getattr(sink, "abandon", None)
            if stop is not None:
                stop()
        if self.network is not None:
            self.network.close(timeout=5.0)
        if self.stage is not None:
            self.stage.close()
        self.closed = self.summary(stop_reason="discarded")

    def save_snapshot(self, name: Optional[str] = None):
        """Write a snapshot now (``name``: a named one, never pruned); returns its directory."""
        if self.snapshots is None:
            raise RuntimeError("this stream has no snapshot directory")
        return self.snapshots.write_now(self, name=name)

    def _map_chunk(self, r: FrameResult) -> tuple:
        """``(epoch, index, points, colours, conf)`` of a frame as the map takes it (strided, confident)."""
        pts, conf = r.world_points(self.opt.map_points, static_only=True)
        st = self.gmap.cfg.pixel_stride
        pts, col, conf = pts[::st, ::st].reshape(-1, 3), r.colors[::st, ::st].reshape(-1, 3), conf[::st, ::st].reshape(-1)
        keep = conf > self.gmap.cfg.conf_thresh
        return self.stage.epoch, r.index, pts[keep].copy(), col[keep].copy(), conf[keep].copy()

    def _integrate_chunks(self, gmap, chunks, epoch: int) -> None:
        """Integrate buffered map chunks (:meth:`_map_chunk`) into ``gmap`` (world of ``epoch``), each
        brought through the corrections made after it was emitted."""
        corr = self.stage.correction_of
        for ep, index, pts, col, conf in chunks:
            X = pts.astype(np.float64)
            for e in range(ep + 1, epoch + 1):
                if e in corr:
                    X = X @ corr[e][:3, :3].T + corr[e][:3, 3]
            gmap.integrate(X.astype(np.float32), col, conf, index)

    def _integrate_unlocalised(self) -> None:
        """The frames seen before the relocalisation, brought into the saved world and into the map."""
        self._integrate_chunks(self.gmap, self._unlocalised, self.stage.epoch)
        self._unlocalised.clear()

    def relocalise_in(self, data) -> None:
        """Start inside a verified snapshot's map (``--relocalise``; before the first frame): its map and
        keyframes are taken, the frames are localised against them (see
        :mod:`streamrecon.slam.relocalise`), then the run extends that map in its world frame."""
        from ..snapshot.state import relocalise_from

        if self.processed:
            raise RuntimeError("relocalise_in() must come before the first frame")
        relocalise_from(self, data)
        self._resend_map = True

    def _readd_recent(self, gmap, upto: int, epoch: int) -> None:
        """Integrate the buffered frames newer than keyframe ``upto`` into ``gmap`` (world of ``epoch``),
        each brought through the corrections it was emitted before."""
        self._integrate_chunks(gmap, [c for c in self._since_kf if c[1] > upto], epoch)

    def _swap_map(self) -> bool:
        """Adopt the map the loop closer rebuilt from the corrected keyframes (plus the frames since its
        newest keyframe)."""
        m = self.stage.take_map() if hasattr(self.stage, "take_map") else None
        if m is None:
            return False
        self._readd_recent(m.gmap, m.upto, m.epoch)
        self.gmap = m.gmap
        self._map_epoch = m.epoch
        self.map_rebuilds += 1
        return True

    def _final_map(self) -> None:
        """End of stream: if a loop was closed after the last rebuild (while the queue drained),
        rebuild from the final keyframe database now, so the map is in the final world."""
        loop = self.stage.loop
        if not self._since_kf.maxlen or self.stage.epoch == self._map_epoch:
            return
        ids, _ = loop.keyframe_poses()
        gmap = loop.rebuild_map(loop.map_factory())
        self._readd_recent(gmap, int(ids[-1]) if len(ids) else -1, self.stage.epoch)
        self.gmap = gmap
        self._map_epoch = self.stage.epoch
        self.map_rebuilds += 1

    def _wants_snapshot(self) -> bool:
        return any(getattr(s, "name", "") == "viewer" for s in self.sinks)

    def _sink_error(self, sink: Sink, e: Exception) -> None:
        self.record_error(f"sink {getattr(sink, 'name', sink)}: {type(e).__name__}: {e}")

    def _check_confidence(self, conf: np.ndarray) -> None:
        """Say once, after 10 frames, when the confidence filter has kept nothing at all."""
        self.conf_max = max(self.conf_max, float(np.nanmax(conf)) if conf.size else 0.0)
        if not self.empty_map_warned and self.processed >= 10 and len(self.gmap) == 0:
            self.empty_map_warned = True
            _logger.warning("the map is empty: no point had confidence above --conf-thresh %.2f in %d frames "
                            "(highest %.3f); lower --conf-thresh to keep points", self.gmap.cfg.conf_thresh,
                            self.processed, self.conf_max)

    def fps(self) -> float:
        r = self._recent
        return (len(r) - 1) / (r[-1] - r[0]) if len(r) > 1 and r[-1] > r[0] else 0.0

    # ------------------------------------------------------------------------------------------

    def probe(self, T_wc: np.ndarray, K: Optional[np.ndarray] = None, hw: Optional[tuple[int, int]] = None,
              name: str = "probe") -> ProbeResult:
        """A raymap query of a virtual camera (the state is unchanged); the result also goes to the sinks."""
        return self.probe_later(T_wc, K, hw, name)()

    def probe_later(self, T_wc: np.ndarray, K: Optional[np.ndarray] = None, hw: Optional[tuple[int, int]] = None,
                    name: str = "probe") -> Callable[[], ProbeResult]:
        """:meth:`probe` whose work can run in another thread (``serve``: off the frame loop): the state
        is taken now (:meth:`StreamEngine.probe_later`); the returned function computes the probe and
        hands it to the sinks (thread-safe: background sinks only enqueue it)."""
        compute = self.engine.probe_later(T_wc, K, hw, name=name)
        xyz, rgb, _ = self.gmap.points()  # the map as of now (a copy: the frame loop goes on)
        voxel = float(self.gmap.voxel_size)

        def run() -> ProbeResult:
            from ..mapping.render import depth_disagreement, render_map

            p = compute()
            view = render_map(xyz, rgb, p.T_wc, p.K, p.conf.shape, voxel_size=voxel)
            p = replace(p, map_rgb=view.rgb, map_depth=view.depth, map_mask=view.mask,
                        disagreement=depth_disagreement(p.points_cam[..., 2], view))
            self._tell_sinks("on_probe", p)
            return p

        return run

    def sink_stats(self) -> dict[str, Any]:
        return {s.name: s.stats.to_dict() for s in self.sinks if isinstance(s, BackgroundSink)}

    def _final_keyframes(self, stamps: np.ndarray, poses: np.ndarray) -> tuple[Optional[tuple], Optional[dict]]:
        """The keyframe poses after the last optimisation and, with ``--refine``, the global alignment."""
        from ..slam.refine import refine_keyframes, refined_trajectory

        ids, S = self.stage.loop.keyframe_poses()
        rows_all = np.frombuffer(self._rows, np.int64) if len(self._rows) else np.zeros(0, np.int64)
        epochs = np.frombuffer(self._row_epochs, np.int32) if len(self._row_epochs) else np.zeros(0, np.int32)
        # a keyframe's id is its result.index; the trajectory row is where that index was consumed
        pos = np.clip(np.searchsorted(rows_all, ids), 0, max(0, len(rows_all) - 1))
        found = (rows_all[pos] == ids) if len(rows_all) else np.zeros(len(ids), bool)
        ids, S, rows = ids[found], S[found], pos[found]
        keyframes = (stamps[rows], S) if len(rows) else None
        corr = self.stage.correction_of
        loc_epoch = self.stage.reloc_info.get("epoch")
        if loc_epoch is not None:  # --relocalise: frames before it are brought into the saved world first
            from ..slam.sim3 import correct_pose

            poses, epochs = poses.copy(), epochs.copy()
            for n in np.flatnonzero(epochs < loc_epoch):
                for e in range(int(epochs[n]) + 1, loc_epoch + 1):
                    if e in corr:
                        poses[n] = correct_pose(corr[e], poses[n])
                epochs[n] = loc_epoch
        if len(rows) and (self.stage.epoch or loc_epoch is not None):  # every frame moves with its keyframe
            self.final_poses["optimized"] = refined_trajectory(poses, rows, poses[rows], S, epochs, corr)
        elif loc_epoch is not None:
            self.final_poses["optimized"] = poses
        if not (self.stage.s.refine and len(rows) >= 3):
            return keyframes, None
        keep = set(ids.tolist())
        res = refine_keyframes([e for e in self.stage.loop.entries() if e.kid in keep], self.stage.loop.loops)
        if res is None:
            self.record_error("refine: too few keyframes or matched points for the global alignment")
            return keyframes, None
        rrows = pos[found][np.searchsorted(ids, res.kf_ids)]
        T = refined_trajectory(poses, rrows, poses[rrows], res.poses, epochs, corr)
        self.final_poses["refined"] = T
        gmap = type(self.gmap)(self.gmap.cfg)
        gmap.integrate(res.map_xyz, res.map_rgb, res.map_conf, 0)
        xyz, rgb, conf = gmap.points()
        self.refine_stats = {"keyframes": len(res.kf_ids), "tracks": res.tracks, "observations": res.observations,
                             "reprojection_px": [round(v, 3) for v in res.error_px], "ms": round(res.ms, 1)}
        return keyframes, {"stamps": stamps, "poses": T, "map_xyz": xyz, "map_rgb": rgb, "map_conf": conf,
                           "stats": self.refine_stats}

    def _slam_summary(self) -> dict[str, Any]:
        if self.stage is None:
            return {"backend": "none"}
        out = {**self.stage.stats(), **({"refine": self.refine_stats} if self.refine_stats else {})}
        if "relocalise" in out:
            out["relocalise"]["frames_not_in_map"] = self.unlocalised_dropped
        return out

    def summary(self, stop_reason: str = "running", interrupted: bool = False, fatal: Optional[str] = None,
                source: Optional[SourceCounts] = None, extra: Optional[dict[str, Any]] = None) -> RunSummary:
        """The summary as of now (``stop_reason="running"`` while the stream goes on)."""
        src = source or SourceCounts(read=self.processed + self.n_errors)
        wall_s = time.monotonic() - self.started
        lat = self.stats.summary()
        return RunSummary(
            stream_id=self.opt.stream_id, frames_in=src.read, processed=self.processed, dropped=src.dropped,
            errors=self.n_errors + src.errors,
            error_messages=self.errors + ([src.last_error] if src.last_error else []),
            fps=round((self.processed - self.restored_frames) / wall_s, 3) if wall_s > 0 else 0.0,
            wall_s=round(wall_s, 3), latency_ms=lat,
            latency_ms_per_frame_mean=lat.get("frame", {}).get("mean", 0.0),
            memory_mb={"peak_rss": round(peak_rss_mb(), 1), "rss_at_frame_10": self.rss_start,
                       "rss_now": round(rss_mb(), 1), "rss_samples": list(self.rss_samples),
                       "device_peak": device_peak_mb(self.engine.device)},
            map={**self.gmap.stats(), "confidence_max": round(self.conf_max, 4), "rebuilds": self.map_rebuilds,
                 **({"dynamic_mask": self.masker.stats()} if self.masker is not None else {})},
            segments=self.segments_seen,
            frames_with_K_given=self.k_given, sinks=self.sink_stats(), in_progress=stop_reason == "running",
            slam=self._slam_summary(), network=self.network_stats(),
            interrupted=interrupted, stop_reason=stop_reason, fatal_error=fatal,
            extra={**self.opt.describe, **(extra or {}), "threads": thread_report(),
                   **({"snapshots": dict(self.snapshots.stats, root=str(self.snapshots.policy.root))}
                      if self.snapshots is not None else {})})

    def close(self, stop_reason: str = "end of stream", interrupted: bool = False, fatal: Optional[str] = None,
              source: Optional[SourceCounts] = None, extra: Optional[dict[str, Any]] = None) -> RunSummary:
        """Hand the final state to every sink (each writes its outputs; background sinks are drained)
        and return the summary. A second call returns the first summary."""
        if self.closed is not None:
            return self.closed
        dense: list[FrameResult] = []
        try:  # --network-every: the frames the network still has go into the map first
            dense = self._drain_network(timeout=5.0 if interrupted or fatal else 120.0)
        except Exception as e:
            self.record_error(f"network at close: {type(e).__name__}: {e}")
        stamps, poses = self.trajectory.arrays()
        keyframes = refined = None
        if self.stage is not None:
            try:
                # the loop closer's queue drained (briefly when interrupted), its last correction applied
                self.stage.finish(timeout=5.0 if interrupted or fatal else 60.0)
                if getattr(self.stage, "loop", None) is not None:
                    self.stage.poll()
                    self._swap_map()
                    self._final_map()
                    keyframes, refined = self._final_keyframes(stamps, poses)
            except Exception as e:  # the online outputs are written whatever happens here
                self.record_error(f"loop closure / refine at close: {type(e).__name__}: {e}")
            finally:
                self.stage.close()
        if self.snapshots is not None:
            try:
                self.snapshots.close()
                if self.snapshots.policy.at_close:
                    self.snapshots.write_now(self)
            except Exception as e:  # the outputs are written whatever happens here
                self.record_error(f"final snapshot: {type(e).__name__}: {e}")
        summary = self.summary(stop_reason, interrupted, fatal, source, extra)
        xyz, rgb, conf = self.gmap.points()
        final = StreamClosed(stream_id=self.opt.stream_id, summary=summary.to_dict(), map_xyz=xyz, map_rgb=rgb,
                             map_conf=conf, stamps=stamps, poses=poses, keyframes=keyframes, refined=refined,
                             optimized=self.final_poses.get("optimized"), dense=tuple(dense))
        # the sink that writes summary.json closes last, so that its list of outputs holds the others' too
        writes_summary = [s for s in self.sinks if hasattr(getattr(s, "inner", s), "write_summary")]
        written: set[str] = set()
        for sink in [s for s in self.sinks if s not in writes_summary] + writes_summary:
            if sink in writes_summary:
                final = replace(final, summary={**final.summary, "outputs": sorted(written)})
            try:
                sink.close(final)
            except Exception as e:
                self._sink_error(sink, e)
            written |= getattr(getattr(sink, "inner", sink), "written", set())
        self.closed = replace(summary, sinks=self.sink_stats(),
                              extra={**summary.extra, "outputs": sorted(written | ({"summary.json"} if written else set()))})
        return self.closed
