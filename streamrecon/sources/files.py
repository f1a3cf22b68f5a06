"""Lossless file sources: image folders (sorted) and video files (decoded sequentially)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..frames import Frame
from .base import FrameSource, SourceError

__all__ = ["ImageFolderSource", "VideoSource", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS"]

_logger = logging.getLogger(__name__)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def _is_depth_map(path: Path) -> bool:
    """``frame-000000.depth.png`` (7-Scenes, SUN3D / 3DMatch fragments): a depth map, not a frame."""
    return path.stem.lower().endswith(".depth") or ".depth." in path.name.lower()


def _read_rgb(path: Path) -> np.ndarray:
    """Decode as the reference loader does: Pillow, EXIF orientation applied, RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.array(ImageOps.exif_transpose(im).convert("RGB"))


class ImageFolderSource(FrameSource):
    """All images of a folder in natural sort order (``frame2`` before ``frame10``).

    Timestamps: a file name that is an integer of 10+ digits is read as nanoseconds (EuRoC/TUM
    style), otherwise ``index / fps``. An unreadable image is counted as an error and skipped.

    Args:
        folder: directory with images.
        fps: nominal rate for timestamps when names carry none.
        stride: deliver every ``stride``-th image.
        repeat: loop over the folder this many times (soak tests); timestamps keep increasing.
    """

    live = False

    def __init__(self, folder: str | Path, fps: float = 30.0, stride: int = 1, repeat: int = 1) -> None:
        super().__init__()
        folder = Path(folder)
        single = folder.is_file() and folder.suffix.lower() in IMAGE_EXTENSIONS  # one photo: a one-frame sequence
        if not (folder.is_dir() or single):
            raise SourceError(f"not a folder: {folder}")
        images = [folder] if single else sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()), key=_natural_key)
        # RGB-D layouts (7-Scenes, SUN3D/3DMatch: frame-000000.color.png beside frame-000000.depth.png):
        # the depth maps are not frames
        self.paths = [p for p in images if not _is_depth_map(p)]
        skipped = len(images) - len(self.paths)
        if not self.paths:
            raise SourceError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}"
                              + (f" (only {skipped} depth maps, *.depth.*)" if skipped else ""))
        if skipped:
            _logger.info("%s: %d images read as frames, %d depth maps (*.depth.*) left out", folder, len(self.paths),
                         skipped)
        self.paths = self.paths[:: max(1, stride)]
        self.name, self.fps, self.repeat = (folder.stem if single else folder.name), fps, max(1, repeat)
        self._closed = False
        stems = [p.stem for p in self.paths]
        self._ns_names = all(s.isdigit() and len(s) >= 10 for s in stems)

    def expected_frames(self) -> Optional[int]:
        return len(self.paths) * self.repeat

    def _stamp(self, i: int, path: Path, loop: int) -> float:
        if self._ns_names:
            span = (int(self.paths[-1].stem) - int(self.paths[0].stem)) * 1e-9 + 1 / self.fps
            return int(path.stem) * 1e-9 + loop * span
        return (loop * len(self.paths) + i) / self.fps

    def frames(self) -> Iterator[Frame]:
        seq = 0
        for loop in range(self.repeat):
            for i, path in enumerate(self.paths):
                if self._closed:
                    return
                try:
                    rgb = _read_rgb(path)
                except Exception as e:  # corrupt/unsupported file: count, skip, go on
                    self.stats.error(f"{path.name}: {e}")
                    _logger.warning("skipping unreadable image %s: %s", path, e)
                    seq += 1
                    continue
                self.stats.add(read=1)
                yield Frame(image=rgb, seq=seq, stamp=self._stamp(i, path, loop), source=self.name)
                seq += 1

    def close(self) -> None:
        self._closed = True


class VideoSource(FrameSource):
    """A video file decoded frame by frame with OpenCV (no seeking, nothing skipped).

    Args:
        path: video file.
        stride: deliver every ``stride``-th frame (the others are still decoded, in order).
        repeat: play the file this many times.
    """

    live = False

    def __init__(self, path: str | Path, stride: int = 1, repeat: int = 1) -> None:
        super().__init__()
        import cv2

        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"video not found: {self.path}")
        cap = cv2.VideoCapture(str(self.path))
        ok = cap.isOpened()
        ok_read = ok and cap.read()[0]
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if ok else 0
        self.fps = cap.get(cv2.CAP_PROP_FPS) if ok else 0.0
        cap.release()
        if not ok_read:
            raise SourceError(f"cannot decode video {self.path} (not a video, or no codec for it)")
        self.name, self.stride, self.repeat = self.path.stem, max(1, stride), max(1, repeat)
        self._n = n if n > 0 else None
        self._closed = False

    def expected_frames(self) -> Optional[int]:
        if self._n is None:
            return None
        return -(-self._n // self.stride) * self.repeat

    def frames(self) -> Iterator[Frame]:
        import cv2

        seq = 0
        offset = 0.0
        for _ in range(self.repeat):
            cap = cv2.VideoCapture(str(self.path))
            last_stamp = 0.0
            try:
                index = 0
                while not self._closed:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    stamp = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                    if stamp <= 0 and index > 0 and self.fps > 0:
                        stamp = index / self.fps
                    last_stamp = stamp
                    self.stats.add(read=1)
                    if index % self.stride == 0:
                        yield Frame(image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), seq=seq, stamp=offset + stamp,
                                    source=self.name)
                    seq += 1
                    index += 1
            finally:
                cap.release()
            offset += last_stamp + (1.0 / self.fps if self.fps > 0 else 0.0)

    def close(self) -> None:
        self._closed = True
