"""Live Rerun view of a run (rerun-sdk 0.41 API). Every ``rerun`` call of the package lives here.

Entity layout (OpenCV world, ``RIGHT_HAND_Y_DOWN``)::

    world                       ViewCoordinates (static)
    world/cam                   Transform3D per frame (camera-to-world)
    camera                      the frame as the camera gave it (long side <= 640 px)
    world/cam/image             Pinhole + the model's input image (model resolution)
    world/cam/image/depth       DepthImage (z of the camera-frame pointmap, metres)
    world/cam/image/confidence  confidence image
    world/cam/image/dynamic     --dynamic-mask: the moving-object score (0..1)
    world/cam/image/dynamic_mask  ... and its mask as a segmentation (1 = kept out of the map)
    world/map/points            only the map points created by this frame (the 3D view accumulates)
    world/map/global            the whole voxel map, re-logged every ``consolidate_every`` frames
    world/trajectory            camera path, one segment per frame (accumulated)
    world/keyframes             keyframe positions of the geometric backend (--backend track)
    world/keyframes_corrected   keyframe positions after the latest loop closure (--backend slam)
    world/loops                 loop-closure edges between keyframes (--backend slam)
    world/virtual/<name>        raymap probes: Transform3D + Pinhole + predicted image and points
    metrics/...                 per-frame scalars (fps, latency per stage, map size, confidence;
                                tracking/state 0 lost 1 weak 2 ok, tracking/inliers,
                                tracking/depth_fit_residual)
    log                         tracking losses and keyframes

With ``serve``, one recording holds every stream, each under its own subtree ``streams/<id>/``
(``streams/<id>/world/...``, ``streams/<id>/metrics/...``).

Timelines: ``frame`` (processed index) and ``capture_time`` (the frame's capture stamp).
Viewers: ``spawn`` starts the native viewer, ``web`` serves the web viewer; both are started as
``rerun`` processes bound to 127.0.0.1 (the SDK's own servers bind every interface). ``save_path``
records an ``.rrd`` (alone or alongside a viewer).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..frames import FrameResult, ProbeResult
from .base import FrameEvent, StreamClosed

__all__ = ["RerunSink", "RerunConfig", "RerunRecording", "blueprint"]

_logger = logging.getLogger(__name__)
_STATE_CODE = {"lost": 0, "weak": 1, "ok": 2, "init": 2}


class RerunConfig:
    """Args:
        viewer: ``spawn``, ``web`` or ``none``.
        save_path: ``.rrd`` file to record to (optional).
        consolidate_every: re-log the whole map (and clear the per-frame points) every N frames.
        max_points_per_frame: cap on new map points logged per frame (random subset beyond it).
        image_quality: JPEG quality for logged images (0 = lossless raw).
        web_port, grpc_port: ports of the web viewer (``web``) and of the viewer's data server.
        bind: address the viewer processes listen on (127.0.0.1 unless told otherwise).
    """

    def __init__(self, viewer: str = "none", save_path: Optional[str] = None, consolidate_every: int = 200,
                 max_points_per_frame: int = 50_000, image_quality: int = 85, web_port: int = 9090,
                 grpc_port: int = 9876, bind: str = "127.0.0.1", application_id: str = "streamrecon",
                 recording_id: Optional[str] = None) -> None:
        if viewer not in ("spawn", "web", "none"):
            raise ValueError(f"viewer must be spawn, web or none, got {viewer!r}")
        self.viewer, self.save_path, self.consolidate_every = viewer, save_path, consolidate_every
        self.max_points_per_frame, self.image_quality = max_points_per_frame, image_quality
        self.web_port, self.grpc_port, self.bind = web_port, grpc_port, bind
        self.application_id, self.recording_id = application_id, recording_id

    @property
    def enabled(self) -> bool:
        return self.viewer != "none" or bool(self.save_path)


def blueprint(prefix: str = ""):
    """3D view (accumulating over time) | input image, depth, confidence, metrics (of the stream under
    ``prefix``; for a multi-stream recording, ``prefix=None`` gives one 3D view of every stream)."""
    import rerun.blueprint as rrb

    accumulate = rrb.VisibleTimeRange("frame", start=rrb.TimeRangeBoundary.infinite(),
                                      end=rrb.TimeRangeBoundary.cursor_relative())
    if prefix is None:
        return rrb.Blueprint(rrb.Horizontal(rrb.Spatial3DView(origin="/streams", name="streams", time_ranges=[accumulate]),
                                            rrb.TimeSeriesView(origin="/streams", name="metrics"), column_shares=[3, 1]),
                             collapse_panels=True)
    w = f"/{prefix}world"
    return rrb.Blueprint(
        rrb.Horizontal(
            rrb.Spatial3DView(origin=w, name="map", time_ranges=[accumulate]),
            rrb.Vertical(
                rrb.Spatial2DView(origin=f"/{prefix}camera", name="camera"),
                rrb.Spatial2DView(origin=f"{w}/cam/image", contents=["$origin", "$origin/image"], name="model input"),
                rrb.Spatial2DView(origin=f"{w}/cam/image/depth", name="depth"),
                rrb.Spatial2DView(origin=f"{w}/cam/image/confidence", name="confidence"),
                rrb.TimeSeriesView(origin=f"/{prefix}metrics", name="metrics"),
            ),
            column_shares=[3, 1],
        ),
        collapse_panels=True,
    )


def _wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return True
        time.sleep(0.1)
    return False


class RerunRecording:
    """One explicit Rerun recording and its viewer process (shared by every stream of a node)."""

    def __init__(self, config: RerunConfig, multi_stream: bool = False) -> None:
        import rerun as rr

        self.rr = rr
        self.cfg = config
        self._viewer_proc: Optional[subprocess.Popen] = None
        self.rec = rr.RecordingStream(config.application_id, recording_id=config.recording_id)
        bp = blueprint(None if multi_stream else "")
        sinks = []
        if config.viewer != "none":
            url = self._start_viewer()
            sinks.append(rr.GrpcSink(url))
        if config.save_path:
            Path(config.save_path).parent.mkdir(parents=True, exist_ok=True)
            sinks.append(rr.FileSink(str(config.save_path)))
        if sinks:
            self.rec.set_sinks(*sinks, default_blueprint=bp)
        self.rec.send_blueprint(bp)

    def _start_viewer(self) -> str:
        cfg = self.cfg
        if cfg.viewer == "spawn" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise RuntimeError("--viewer spawn needs a display; use --viewer web or --save-rrd on a headless machine")
        cmd = [sys.executable, "-m", "rerun", "--bind", cfg.bind, "--port", str(cfg.grpc_port), "--memory-limit", "50%",
               "--expect-data-soon"]
        if cfg.viewer == "web":
            cmd += ["--serve-web", "--web-viewer-port", str(cfg.web_port), "--server-memory-limit", "1GiB"]
        # its own process group: `python -m rerun` starts the real viewer binary as a child, and both must go
        self._viewer_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=cfg.viewer == "web")
        host = "127.0.0.1" if cfg.bind in ("0.0.0.0", "::") else cfg.bind
        if not _wait_port(host, cfg.grpc_port, 15.0):
            self._stop_viewer()
            raise RuntimeError(f"the Rerun viewer did not start listening on {host}:{cfg.grpc_port}")
        if cfg.viewer == "web":
            _logger.warning("Rerun web viewer: http://%s:%d?url=rerun%%2Bhttp%%3A%%2F%%2F%s%%3A%d%%2Fproxy",
                            host, cfg.web_port, host, cfg.grpc_port)
        return f"rerun+http://{host}:{cfg.grpc_port}/proxy"

    def close(self) -> None:
        try:
            self.rec.flush(timeout_sec=10.0)
        except Exception as e:  # a viewer that went away must not lose the other outputs
            _logger.warning("Rerun flush failed: %s", e)
        self.rec.disconnect()
        if self.cfg.viewer == "web":  # the native viewer (spawn) stays open for the user; the web server goes
            self._stop_viewer()

    def _stop_viewer(self) -> None:
        """Stop the viewer's whole process group (the wrapper and the binary it started): SIGTERM, then
        SIGKILL after 5 s."""
        proc, self._viewer_proc = self._viewer_proc, None
        if proc is None:
            return
        import signal

        def signal_group(sig: int) -> None:
            try:
                os.killpg(proc.pid, sig) if self.cfg.viewer == "web" else proc.send_signal(sig)
            except ProcessLookupError:
                pass

        signal_group(signal.SIGTERM)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        signal_group(signal.SIGKILL)  # whatever of the group is left (the binary outlives its wrapper)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            _logger.warning("the Rerun viewer (pid %d) did not stop", proc.pid)

    @property
    def viewer_pid(self) -> Optional[int]:
        """The viewer process's pid (its process group with ``web``), while it runs."""
        return None if self._viewer_proc is None else self._viewer_proc.pid


class RerunSink:
    """Logs one stream's frames, growing map, probes and metrics into a recording.

    Args:
        config: the view settings (a recording is made from it unless ``recording`` is given).
        recording: a shared recording (``serve``); the sink then does not close it.
        prefix: entity subtree of this stream (``""`` for ``run``, ``"streams/<id>/"`` for ``serve``).
    """

    name = "viewer"

    def __init__(self, config: RerunConfig, recording: Optional[RerunRecording] = None, prefix: str = "") -> None:
        self._own = recording is None
        self.recording = recording or RerunRecording(config)
        self.rr, self.rec, self.cfg = self.recording.rr, self.recording.rec, config
        self.p = prefix
        rr = self.rr
        self.rec.log(f"{prefix}world", rr.ViewCoordinates.RIGHT_HAND_Y_DOWN, static=True)
        for name in ("fps", "latency_ms/total", "map_points", "conf_mean", "dropped"):
            self.rec.log(f"{prefix}metrics/{name}", rr.SeriesLines(names=name), static=True)
        self._last_position: Optional[np.ndarray] = None
        self._rng = np.random.default_rng(0)
        self._frames = 0
        self._dynamic_shown = False  # a dynamic score was logged for the last frame

    # sink protocol ------------------------------------------------------------------------------

    def on_frame(self, event: FrameEvent) -> None:
        self.log_frame(event.result, event.new_points, event.new_colors, event.metrics)
        for d in event.dense[-1:]:  # --network-every: the newest network frame that arrived, at its own pose
            self.log_network_view(d)
        if event.preview is not None:  # the frame as the camera gave it (the model sees a small crop of it)
            self.rec.log(f"{self.p}camera", self._image(event.preview))
        if event.loop is not None:
            self.log_loop(event.loop)
        if event.map_snapshot is not None:
            self.log_map(event.result.index, *event.map_snapshot)

    def on_probe(self, probe: ProbeResult) -> None:
        self.log_probe(probe)

    def close(self, final: Optional[StreamClosed] = None) -> None:
        if final is not None and len(final.map_xyz):
            self.rec.set_time("frame", sequence=max(self._frames - 1, 0))
            self.rec.log(f"{self.p}world/map/global", self.rr.Points3D(final.map_xyz, colors=final.map_rgb, radii=-1.5),
                         static=True)
        if self._own:
            self.recording.close()

    # ----------------------------------------------------------------------------------------

    def _set_time(self, index: int, stamp: float) -> None:
        self.rec.set_time("frame", sequence=index)
        if stamp > 1e8:  # an absolute (epoch) time
            self.rec.set_time("capture_time", timestamp=stamp)
        else:
            self.rec.set_time("capture_time", duration=stamp)

    def _image(self, rgb: np.ndarray):
        img = self.rr.Image(rgb)
        return img.compress(jpeg_quality=self.cfg.image_quality) if self.cfg.image_quality else img

    def log_frame(self, result: FrameResult, new_points: np.ndarray, new_colors: np.ndarray, metrics: dict) -> None:
        """One processed frame: camera, images, new map points, trajectory step, metrics."""
        rr = self.rr
        self._set_time(result.index, result.stamp)
        h, w = result.crop.output_hw if not result.network else result.depth.shape
        self._log_camera("world/cam", result.T_wc, result.K, (h, w))
        if result.network:  # (--network-every: a tracked-only frame keeps the last network images on show)
            self.log_images(result)
        if result.dynamic is not None:
            self.rec.log(f"{self.p}world/cam/image/dynamic", rr.Image(result.dynamic.astype(np.float32)))
            self.rec.log(f"{self.p}world/cam/image/dynamic_mask", rr.SegmentationImage(result.dynamic_mask.astype(np.uint8)))
            self._dynamic_shown = True
        elif self._dynamic_shown:  # a frame without a score: no stale mask from an earlier one
            for name in ("dynamic", "dynamic_mask"):
                self.rec.log(f"{self.p}world/cam/image/{name}", rr.Clear(recursive=False))
            self._dynamic_shown = False
        if len(new_points):
            if len(new_points) > self.cfg.max_points_per_frame:
                pick = self._rng.choice(len(new_points), self.cfg.max_points_per_frame, replace=False)
                new_points, new_colors = new_points[pick], new_colors[pick]
            self.rec.log(f"{self.p}world/map/points", rr.Points3D(new_points, colors=new_colors, radii=-1.5))
        position = result.T_wc[:3, 3].astype(np.float32)
        if self._last_position is not None:
            self.rec.log(f"{self.p}world/trajectory", rr.LineStrips3D([np.stack([self._last_position, position])],
                                                             colors=[255, 80, 0]))
        self._last_position = position
        for name, value in metrics.items():
            self.rec.log(f"{self.p}metrics/{name}", rr.Scalars(float(value)))
        tr = result.tracking
        if tr is not None:  # the geometric backend: state (0 lost, 1 weak, 2 ok/init), inliers, keyframes
            self.rec.log(f"{self.p}metrics/tracking/state", rr.Scalars(float(_STATE_CODE.get(tr.state, 0))))
            self.rec.log(f"{self.p}metrics/tracking/inliers", rr.Scalars(float(tr.inliers)))
            if tr.depth_fit_residual is not None:  # --depth-fit: the landmarks' log-depth residual left
                self.rec.log(f"{self.p}metrics/tracking/depth_fit_residual", rr.Scalars(float(tr.depth_fit_residual)))
            if tr.keyframe:
                self.rec.log(f"{self.p}world/keyframes", rr.Points3D([position], colors=[[0, 160, 255]], radii=-4.0))
            if tr.state == "lost" or tr.keyframe:
                self.rec.log(f"{self.p}log", rr.TextLog(f"frame {result.index}: tracking {tr.state} ({tr.method}, "
                                                         f"{tr.inliers}/{tr.tracked} inliers)",
                                                         level="WARN" if tr.state == "lost" else "INFO"))
        self._frames += 1

    def log_images(self, result: FrameResult, entity: str = "world/cam") -> None:
        """A network frame's colours, depth and confidence under ``entity/image`` (at the current time)."""
        rr = self.rr
        self.rec.log(f"{self.p}{entity}/image", self._image(result.colors))
        self.rec.log(f"{self.p}{entity}/image/depth", rr.DepthImage(result.depth, meter=1.0))
        self.rec.log(f"{self.p}{entity}/image/confidence", rr.Image(result.conf_cam.astype(np.float32)))

    def log_network_view(self, result: FrameResult) -> None:
        """``--network-every``: a network frame that arrived after its frame was tracked, under
        ``world/network_cam`` with that frame's own pose and intrinsics (its depth is not the current
        camera's, so it is not shown there)."""
        self._log_camera("world/network_cam", result.T_wc, result.K, result.depth.shape)
        self.log_images(result, "world/network_cam")

    def _log_camera(self, entity: str, T_wc: np.ndarray, K: np.ndarray, hw: tuple) -> None:
        """A camera's pose (``T_wc``) at ``entity`` and its pinhole (``K``, ``(H, W)``) at ``entity/image``."""
        rr = self.rr
        self.rec.log(f"{self.p}{entity}", rr.Transform3D(translation=T_wc[:3, 3], mat3x3=T_wc[:3, :3]))
        self.rec.log(f"{self.p}{entity}/image", rr.Pinhole(image_from_camera=K, resolution=[hw[1], hw[0]],
                                                          camera_xyz=rr.ViewCoordinates.RDF, image_plane_distance=0.1))

    def log_loop(self, loop: dict) -> None:
        """A loop closure: every loop edge so far, the corrected keyframes, a log line."""
        rr = self.rr
        self.rec.log(f"{self.p}world/loops", rr.LineStrips3D(list(loop["edges"]), colors=[255, 0, 200]))
        self.rec.log(f"{self.p}world/keyframes", rr.Clear(recursive=False))
        self.rec.log(f"{self.p}world/keyframes_corrected", rr.Points3D(loop["keyframes"], colors=[[0, 160, 255]],
                                                                       radii=-4.0))
        i, j, n = loop["edge"]
        self.rec.log(f"{self.p}log", rr.TextLog(f"loop closed: keyframe {j} <-> {i} ({n} inliers)", level="INFO"))

    def log_map(self, index: int, xyz: np.ndarray, rgb: np.ndarray) -> None:
        """Consolidate: the whole map to ``world/map/global``, per-frame points cleared."""
        self.rec.set_time("frame", sequence=index)
        self.rec.log(f"{self.p}world/map/global", self.rr.Points3D(xyz, colors=rgb, radii=-1.5), static=True)
        self.rec.log(f"{self.p}world/map/points", self.rr.Clear(recursive=True))

    def log_probe(self, probe: ProbeResult) -> None:
        rr = self.rr
        base = f"{self.p}world/virtual/{probe.name}"
        h, w = probe.conf.shape
        self.rec.set_time("frame", sequence=probe.frame_index)
        self.rec.log(base, rr.Transform3D(translation=probe.T_wc[:3, 3], mat3x3=probe.T_wc[:3, :3]))
        self.rec.log(f"{base}/image", rr.Pinhole(image_from_camera=probe.K, resolution=[w, h],
                                                 camera_xyz=rr.ViewCoordinates.RDF, image_plane_distance=0.1))
        self.rec.log(f"{base}/image", self._image(probe.rgb))
        self.rec.log(f"{base}/points", rr.Points3D(probe.points_cam.reshape(-1, 3), colors=probe.rgb.reshape(-1, 3),
                                                   radii=-1.0))
        if probe.map_rgb is not None:  # what the map already knows from there, and where the two disagree
            self.rec.log(f"{self.p}probes/{probe.name}/map", self._image(probe.map_rgb))
            self.rec.log(f"{self.p}probes/{probe.name}/disagreement",
                         rr.DepthImage(np.nan_to_num(probe.disagreement, nan=0.0).astype(np.float32)))

    def log_text(self, text: str, level: str = "INFO") -> None:
        self.rec.log(f"{self.p}log", self.rr.TextLog(text, level=level))
