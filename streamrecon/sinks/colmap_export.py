"""``--export colmap``: the run as a COLMAP model and a nerfstudio ``transforms.json``, for the tools
that start from a COLMAP reconstruction (COLMAP, GLOMAP, nerfstudio, Gaussian-splatting trainers).

Layout, under ``<output-dir>/colmap/``::

    images/NNNNNN.jpg        every processed frame as the model saw it before cropping (undistorted
                             with --calib), full resolution
    sparse/0/                cameras.bin, images.bin, points3D.bin (+ rigs.bin, frames.bin) -- binary model
    sparse/0_text/           the same model in COLMAP's text format
    sparse_pc.ply            the map's points (the splat initialisation nerfstudio reads)
    transforms.json          nerfstudio: per-frame intrinsics and camera-to-world (OpenGL axes)

Each image has its own PINHOLE camera (``fx fy cx cy`` of the frame in original pixels: the network's
focal estimate, or the known intrinsics); poses are the final trajectory (``trajectory_optimized`` after
a loop closure), ``cam_from_world`` = ``inv(T_wc)``. The map points carry colours and no tracks (no
2D observations): enough to initialise a splat or to be refined by COLMAP's triangulator. The model is
written with pycolmap (``pip install "streamrecon[export]"``), never with hand-written binary code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..fileio import atomic_write_bytes, atomic_write_text, confine
from ..frames import ProbeResult
from ..mapping import write_ply
from .base import FrameEvent, StreamClosed

__all__ = ["ColmapSink", "require_pycolmap"]

_logger = logging.getLogger(__name__)
_GL_FROM_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV camera axes (x right, y down, z forward) -> OpenGL


def require_pycolmap():
    """The pycolmap module, or an ``ImportError`` saying how to install it."""
    try:
        import pycolmap
    except ImportError:
        raise ImportError('--export colmap needs pycolmap: pip install "streamrecon[export]"') from None
    return pycolmap


class ColmapSink:
    """Args:
        out_dir: the run's (or stream's) output directory; files go to ``out_dir/colmap/``.
        root: the directory no write may leave (default ``out_dir``).
        quality: JPEG quality of the exported images.
    """

    name = "colmap"
    wants_image = True  # FrameEvent.image: the frame as the camera gave it (after undistortion)

    def __init__(self, out_dir: str | Path, root: Optional[str | Path] = None, quality: int = 95) -> None:
        require_pycolmap()  # refused before the first frame, not at the end of a long run
        self.root = Path(root) if root is not None else Path(out_dir)
        self.dir = confine(self.root, Path(out_dir) / "colmap")
        self.quality = quality
        self.frames: list[tuple[str, np.ndarray, int, int]] = []  # (image name, K (3, 3) original pixels, w, h)
        self.written: set[str] = set()
        self._offset = 0  # a resumed run: trajectory rows before its first frame (their images are not here)

    def _path(self, name: str) -> Path:
        return confine(self.root, self.dir / name)

    def on_frame(self, event: FrameEvent) -> None:
        import cv2

        img, r = event.image, event.result
        if img is None:
            return
        name = f"{r.index:06d}.jpg"
        ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise ValueError(f"frame {r.index}: JPEG encoding failed")
        atomic_write_bytes(self._path(f"images/{name}"), jpg.tobytes())
        K = r.K_given if r.K_given is not None else r.K_original
        self.frames.append((name, np.asarray(K, np.float64), img.shape[1], img.shape[0]))
        self.written.add("colmap/")

    def on_probe(self, probe: ProbeResult) -> None:
        pass

    def on_resume(self, stamps: np.ndarray, poses: np.ndarray) -> None:
        """A resumed run: the snapshot's frames have no images here; the model holds the frames from now on."""
        self._offset = len(stamps)

    def close(self, final: StreamClosed) -> None:
        poses = (final.optimized if final.optimized is not None else final.poses)[self._offset:]
        n = min(len(self.frames), len(poses))
        if not n:
            return
        if len(self.frames) != len(poses):
            _logger.warning("colmap export: %d images, %d poses; the first %d are exported", len(self.frames),
                            len(poses), n)
        rec = build_reconstruction(self.frames[:n], poses[:n], final.map_xyz, final.map_rgb)
        for sub, write in (("sparse/0", rec.write_binary), ("sparse/0_text", rec.write_text)):
            d = self._path(sub)
            d.mkdir(parents=True, exist_ok=True)
            write(str(d))
        write_ply(self._path("sparse_pc.ply"), final.map_xyz, final.map_rgb, final.map_conf)
        atomic_write_text(self._path("transforms.json"), json.dumps(transforms_json(self.frames[:n], poses[:n]),
                                                                    indent=1) + "\n")
        self.written.add("colmap/")
        _logger.info("colmap export: %d images, %d points in %s", n, len(final.map_xyz), self.dir)


def build_reconstruction(frames: list[tuple[str, np.ndarray, int, int]], poses: np.ndarray, xyz: np.ndarray,
                         rgb: np.ndarray):
    """A ``pycolmap.Reconstruction``: one PINHOLE camera (and trivial rig/frame) per image, its pose
    ``cam_from_world = inv(T_wc)``; the map points (``(N, 3)`` world, ``(N, 3)`` uint8) without tracks."""
    pycolmap = require_pycolmap()
    rec = pycolmap.Reconstruction()
    for i, ((name, K, w, h), T_wc) in enumerate(zip(frames, poses), start=1):
        cam = pycolmap.Camera(model="PINHOLE", width=int(w), height=int(h),
                              params=[float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2])], camera_id=i)
        rec.add_camera_with_trivial_rig(cam)
        T_cw = np.linalg.inv(np.asarray(T_wc, np.float64))
        cam_from_world = pycolmap.Rigid3d(pycolmap.Rotation3d(T_cw[:3, :3]), T_cw[:3, 3])
        rec.add_image_with_trivial_frame(pycolmap.Image(name=name, camera_id=i, image_id=i), cam_from_world)
    track = pycolmap.Track()
    xyz64, rgb8 = np.asarray(xyz, np.float64), np.asarray(rgb, np.uint8)
    for p, c in zip(xyz64, rgb8):
        rec.add_point3D(p, track, c)
    return rec


def transforms_json(frames: list[tuple[str, np.ndarray, int, int]], poses: np.ndarray) -> dict[str, Any]:
    """nerfstudio's ``transforms.json``: per-frame ``fl_x fl_y cx cy w h`` and ``transform_matrix``
    (camera-to-world, OpenGL camera axes), the map as ``ply_file_path``."""
    out = []
    for (name, K, w, h), T_wc in zip(frames, poses):
        out.append({"file_path": f"images/{name}", "fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]),
                    "cx": float(K[0, 2]), "cy": float(K[1, 2]), "w": int(w), "h": int(h),
                    "transform_matrix": (np.asarray(T_wc, np.float64) @ _GL_FROM_CV).tolist()})
    return {"camera_model": "PINHOLE", "ply_file_path": "sparse_pc.ply", "frames": out}
