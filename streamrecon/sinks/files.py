"""Files of a run in ``--output-dir`` (each written atomically: temp file + rename).

* ``trajectory.txt`` -- TUM (``t tx ty tz qx qy qz qw``, camera-to-world, global frame);
* ``map.ply`` / ``map.glb`` -- the voxel map (GLB also holds the camera path);
* ``frames/NNNNNN.npz`` (optional) -- per-frame pointmaps, confidences, pose, intrinsics, colours;
* ``probes/<name>_NNNNNN.npz|.png`` -- raymap probe predictions;
* ``summary.json`` -- counters, fps, latency percentiles, memory, map statistics, config.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_text
from ..frames import FrameResult, ProbeResult
from ..mapping import GlobalMap, write_glb, write_ply, write_tum

__all__ = ["OutputWriter"]

_logger = logging.getLogger(__name__)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class OutputWriter:
    """Args:
        out_dir: output directory (created).
        save_frames: also write one ``.npz`` per processed frame.
    """

    def __init__(self, out_dir: str | Path, save_frames: bool = False) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.save_frames = save_frames
        self._stamps: list[float] = []
        self._poses = np.empty((0, 4, 4))
        self._pose_chunk: list[np.ndarray] = []
        self.written: set[str] = set()

    def add_frame(self, r: FrameResult) -> None:
        self._stamps.append(r.stamp)
        self._pose_chunk.append(r.T_wc)
        if len(self._pose_chunk) >= 256:
            self._consolidate()
        if self.save_frames:
            name = f"frames/{r.index:06d}.npz"
            atomic_write_bytes(self.dir / name, _npz_bytes(
                points_cam=r.points_cam, points_world=r.points_world_pose, points_world_head=r.points_world_head,
                conf_cam=r.conf_cam, conf_world=r.conf_world, depth=r.depth, T_wc=r.T_wc, K=r.K,
                K_original=r.K_original, colors=r.colors, stamp=np.float64(r.stamp), seq=np.int64(r.seq)))

    def _consolidate(self) -> None:
        if self._pose_chunk:
            self._poses = np.concatenate([self._poses, np.stack(self._pose_chunk)])
            self._pose_chunk = []

    @property
    def trajectory(self) -> tuple[list[float], np.ndarray]:
        self._consolidate()
        return self._stamps, self._poses

    def add_probe(self, p: ProbeResult) -> None:
        import cv2

        stem = f"probes/{p.name}_{p.frame_index:06d}"
        atomic_write_bytes(self.dir / f"{stem}.npz", _npz_bytes(
            points_cam=p.points_cam, points_world=p.points_world, conf=p.conf, rgb=p.rgb, T_wc=p.T_wc, K=p.K,
            pose_estimate=p.pose_estimate))
        ok, png = cv2.imencode(".png", cv2.cvtColor(p.rgb, cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(self.dir / f"{stem}.png", png.tobytes())
        self.written.add("probes/")

    def write_trajectory(self) -> None:
        stamps, poses = self.trajectory
        write_tum(self.dir / "trajectory.txt", stamps, poses)
        self.written.add("trajectory.txt")

    def write_map(self, gmap: GlobalMap) -> None:
        xyz, rgb, conf = gmap.points()
        write_ply(self.dir / "map.ply", xyz, rgb, conf)
        _, poses = self.trajectory
        write_glb(self.dir / "map.glb", xyz, rgb, path_xyz=poses[:, :3, 3] if len(poses) else None)
        self.written.update({"map.ply", "map.glb"})

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=1, default=_json_default) + "\n")
        self.written.add("summary.json")

    def write_all(self, gmap: Optional[GlobalMap], summary: dict[str, Any]) -> None:
        """Trajectory, map and summary; each independently, so one failure does not lose the rest."""
        for name, fn in (("trajectory", self.write_trajectory), ("map", lambda: gmap is not None and self.write_map(gmap))):
            try:
                fn()
            except Exception as e:  # e.g. disk full: report, keep writing the others
                _logger.error("could not write the %s: %s", name, e)
                summary.setdefault("output_errors", []).append(f"{name}: {e}")
        summary["outputs"] = sorted(self.written | {"summary.json"})
        self.write_summary(summary)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
