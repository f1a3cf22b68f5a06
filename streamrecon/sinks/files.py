"""``FileSink``: the files of one stream in its output directory (``run`` and, per stream, ``serve``).

* ``trajectory.txt`` -- TUM (``t tx ty tz qx qy qz qw``, camera-to-world, global frame), written
  append-only: each frame adds one line; the file is flushed and fsynced every ``flush_every`` frames
  and at the end (constant cost per frame however long the run);
* ``map.ply`` / ``map.glb`` -- the voxel map at the end, and every ``--map-every-s`` seconds while the
  stream runs (GLB also holds the camera path; atomic);
* ``frames/NNNNNN.npz`` (optional) -- per-frame pointmaps, confidences, pose, intrinsics (``K``
  estimated at model resolution, ``K_original`` in original pixels, ``K_given`` when the frame came
  with intrinsics, else an all-NaN 3x3), colours; with ``--dynamic-mask``, ``dynamic`` (float16 score
  0..1, how likely the pixel moves) and ``dynamic_mask`` (bool, the pixels kept out of the map) on the
  frames that were scored;
* ``pointmap.ply`` (a single image) -- every pixel of its pointmap with colours and confidence;
* ``probes/<name>_NNNNNN.npz|.png`` -- raymap probe predictions (names are sanitised to
  ``[A-Za-z0-9_.-]``: a probe name never leaves ``probes/``);
* ``summary.json`` -- counters, fps, latency percentiles, memory, map statistics, config
  (rewritten atomically every ``flush_every`` frames or ``flush_every_s`` seconds, with
  ``"in_progress": true``, and at the end).

Run it behind :class:`~streamrecon.sinks.base.BackgroundSink` (``drop=False``): it never drops.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from pathlib import Path
from typing import IO, Any, Optional

import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_text, confine
from ..frames import FrameResult, ProbeResult
from ..mapping import TUM_HEADER, tum_lines, write_glb, write_ply
from .base import FrameEvent, StreamClosed

__all__ = ["FileSink", "safe_name", "json_default", "write_map_files"]

_logger = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_NAN_K = np.full((3, 3), np.nan)


def safe_name(name: str, limit: int = 64) -> str:
    """A file-name component: characters outside ``[A-Za-z0-9_.-]`` become ``_``, no leading dot."""
    out = _UNSAFE.sub("_", str(name))[:limit].lstrip(".")
    return out or "unnamed"


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _rigid(S: np.ndarray) -> np.ndarray:
    """``(K, 4, 4)`` Sim(3) keyframe poses -> their ``T_wc`` (the scale divided out of the rotation)."""
    out = np.array(S, np.float64, copy=True)
    s = np.cbrt(np.linalg.det(out[:, :3, :3]))
    out[:, :3, :3] /= s[:, None, None]
    return out


def write_map_files(directory: Path, xyz: np.ndarray, rgb: np.ndarray, conf: np.ndarray, poses: np.ndarray) -> list[str]:
    """``map.ply`` and ``map.glb`` (with the camera path of ``poses`` ``(F, 4, 4)`` ``T_wc``), atomically."""
    write_ply(directory / "map.ply", xyz, rgb, conf)
    write_glb(directory / "map.glb", xyz, rgb, path_xyz=poses[:, :3, 3] if len(poses) else None)
    return ["map.ply", "map.glb"]


class FileSink:
    """Args:
        out_dir: output directory (created).
        save_frames: also write one ``.npz`` per processed frame.
        flush_every: fsync the trajectory and rewrite ``summary.json`` every N frames (0 = only at the end).
        dense_ply: also write ``pointmap.ply``: every pixel of the last frame (camera frame = world frame of
            the first one), colours and confidence -- a single image's whole pointmap (DUSt3R-style).
        root: the directory no write may leave (default ``out_dir``; ``serve``: its output directory).
            Every file is checked against it with :func:`~streamrecon.fileio.confine` when written, so a
            symlink planted in the stream's folder never carries a write outside.
    """

    name = "files"

    def __init__(self, out_dir: str | Path, save_frames: bool = False, flush_every: int = 100,
                 root: Optional[str | Path] = None, dense_ply: bool = False) -> None:
        self.dir = Path(out_dir)
        self.dense_ply = dense_ply  # a single image: pointmap.ply with every pixel of the last frame
        self._last = None
        self.root = Path(root) if root is not None else self.dir
        confine(self.root, self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save_frames, self.flush_every = save_frames, flush_every
        self.written: set[str] = set()
        self._traj: Optional[IO[str]] = None
        self._since_flush = 0

    # ------------------------------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        """``out_dir / name``, refused (:class:`~streamrecon.fileio.UnsafePathError`) if it leads out of the root."""
        return confine(self.root, self.dir / name)

    def _trajectory_file(self) -> IO[str]:
        if self._traj is None:
            self._traj = open(self._path("trajectory.txt"), "w", buffering=1 << 16)
            self._traj.write(TUM_HEADER)
            self.written.add("trajectory.txt")
        return self._traj

    def _sync_trajectory(self) -> None:
        f = self._trajectory_file()
        f.flush()
        os.fsync(f.fileno())
        self._since_flush = 0

    def on_resume(self, stamps: np.ndarray, poses: np.ndarray) -> None:
        """A resumed stream: ``trajectory.txt`` starts again with every frame of the snapshot."""
        if self._traj is not None:
            self._traj.close()
        self._traj = None
        f = self._trajectory_file()
        if len(stamps):
            f.write(tum_lines(stamps, poses))
        self._sync_trajectory()

    def on_frame(self, event: FrameEvent) -> None:
        r = event.result
        if self.dense_ply:
            self._last = r
        self._trajectory_file().write(tum_lines([r.stamp], r.T_wc[None]))
        self._since_flush += 1
        if self.save_frames:
            for d in event.dense_results():  # --network-every: the network's frames, when they arrive
                self._write_frame(d)
        if self.flush_every and self._since_flush >= self.flush_every and event.summary is None:
            self._sync_trajectory()
        if event.summary is not None:
            self.on_flush(event.summary, event.map_files)

    def _write_frame(self, r: FrameResult) -> None:
        atomic_write_bytes(self._path(f"frames/{r.index:06d}.npz"), _npz_bytes(
            points_cam=r.points_cam, points_world=r.points_world_pose, points_world_head=r.points_world_head,
            conf_cam=r.conf_cam, conf_world=r.conf_world, depth=r.depth, T_wc=r.T_wc, K=r.K,
            K_original=r.K_original, K_given=r.K_given if r.K_given is not None else _NAN_K, colors=r.colors,
            stamp=np.float64(r.stamp), seq=np.int64(r.seq),
            **({} if r.dynamic is None else {"dynamic": r.dynamic.astype(np.float16)}),
            **({} if r.dynamic_mask is None else {"dynamic_mask": r.dynamic_mask})))
        self.written.add("frames/")

    def on_flush(self, summary: dict[str, Any], map_files: Optional[tuple] = None) -> None:
        """A periodic flush: the map when given (``(xyz, rgb, conf, poses)``), the trajectory fsynced,
        the running summary (which says ``in_progress``)."""
        if map_files is not None:
            xyz, rgb, conf, poses = map_files
            self.written.update(write_map_files(self._path("."), xyz, rgb, conf, poses))
        self._sync_trajectory()
        self.write_summary({**summary, "outputs": sorted(self.written | {"summary.json"})})

    def on_probe(self, p: ProbeResult) -> None:
        import cv2

        stem = f"probes/{safe_name(p.name)}_{p.frame_index:06d}"
        atomic_write_bytes(self._path(f"{stem}.npz"), _npz_bytes(
            points_cam=p.points_cam, points_world=p.points_world, conf=p.conf, rgb=p.rgb, T_wc=p.T_wc, K=p.K,
            pose_estimate=p.pose_estimate, **p.map_arrays()))
        for suffix, image in (("", p.rgb), ("_map", p.map_rgb)):  # the network's view, and the map's
            if image is None:
                continue
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if ok:
                atomic_write_bytes(self._path(f"{stem}{suffix}.png"), png.tobytes())
        self.written.add("probes/")

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self._path("summary.json"), json.dumps(summary, indent=1, default=json_default) + "\n")
        self.written.add("summary.json")

    def close(self, final: StreamClosed) -> None:
        """Trajectory (fsync), map and summary; each independently, so one failure does not lose the rest."""
        summary = dict(final.summary)
        errors: list[str] = list(summary.get("output_errors", []))

        def late_frames() -> None:  # --network-every: network results that came after the last frame
            if self.save_frames:
                for d in final.dense:
                    self._write_frame(d)

        def map_files() -> None:
            self.written.update(write_map_files(self._path("."), final.map_xyz, final.map_rgb, final.map_conf, final.poses))

        def trajectory() -> None:
            self._sync_trajectory()
            self._traj.close()

        def keyframes() -> None:
            if final.keyframes is not None and len(final.keyframes[0]):
                atomic_write_text(self._path("keyframes.txt"), TUM_HEADER + tum_lines(final.keyframes[0],
                                                                                      _rigid(final.keyframes[1])))
                self.written.add("keyframes.txt")

        def optimized() -> None:
            if final.optimized is not None:
                atomic_write_text(self._path("trajectory_optimized.txt"), TUM_HEADER + tum_lines(final.stamps,
                                                                                                 final.optimized))
                self.written.add("trajectory_optimized.txt")

        def refined() -> None:
            ref = final.refined
            if ref is None:
                return
            atomic_write_text(self._path("trajectory_refined.txt"), TUM_HEADER + tum_lines(ref["stamps"], ref["poses"]))
            write_ply(self._path("map_refined.ply"), ref["map_xyz"], ref["map_rgb"], ref["map_conf"])
            self.written.update({"trajectory_refined.txt", "map_refined.ply"})

        def pointmap() -> None:
            r = self._last
            if r is None:
                return
            pts, keep = r.points_world_pose.reshape(-1, 3), np.isfinite(r.points_world_pose).all(-1).reshape(-1)
            write_ply(self._path("pointmap.ply"), pts[keep], r.colors.reshape(-1, 3)[keep], r.conf_cam.reshape(-1)[keep])
            self.written.add("pointmap.ply")

        for name, fn in (("frames", late_frames), ("trajectory", trajectory), ("map", map_files), ("keyframes", keyframes),
                         ("optimized", optimized),
                         ("refined", refined), ("pointmap", pointmap)):
            try:
                fn()
            except Exception as e:  # e.g. disk full: report, keep writing the others
                _logger.error("could not write the %s: %s", name, e)
                errors.append(f"{name}: {e}")
        if errors:
            summary["output_errors"] = errors
        summary["outputs"] = sorted(self.written | set(summary.get("outputs", [])) | {"summary.json"})
        self.write_summary(summary)
