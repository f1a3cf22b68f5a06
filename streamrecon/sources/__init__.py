"""Frame sources: live cameras (newest frame wins), video files and image folders (lossless).

:func:`open_source` picks the source from a spec string:

* ``0``, ``cam:0``, ``/dev/video0`` -> :class:`CameraSource`;
* a directory -> :class:`ImageFolderSource`; a video file -> :class:`VideoSource`;
* ``live:<video>`` -> a video replayed in real time as a camera;
* ``zmq://...`` / ``tcp://...`` -> ZeroMQ feeds are served by ``streamrecon serve``.
"""

from __future__ import annotations

from pathlib import Path

from .base import FrameSource, SourceError, SourceStats
from .camera import CameraSource
from .files import IMAGE_EXTENSIONS, ImageFolderSource, VideoSource

__all__ = ["FrameSource", "SourceError", "SourceStats", "CameraSource", "ImageFolderSource", "VideoSource",
           "open_source"]


def open_source(spec: str, stride: int = 1, repeat: int = 1, fps: float = 30.0) -> FrameSource:
    """Open the source named by ``spec`` (see module docstring).

    Raises:
        SourceError: with a message naming what is wrong (missing path, unreadable video, no camera).
    """
    spec = str(spec).strip()
    if spec.startswith(("zmq://", "tcp://", "ipc://")):
        raise SourceError(f"{spec}: ZeroMQ feeds are received by `streamrecon serve`, not `run`")
    if spec.startswith("cam:"):
        dev = spec[4:]
        return CameraSource(int(dev) if dev.isdigit() else dev)
    if spec.isdigit():
        return CameraSource(int(spec))
    if spec.startswith("/dev/video"):
        return CameraSource(spec)
    if spec.startswith("live:"):
        return CameraSource(spec[5:], name=Path(spec[5:]).stem, realtime=True)
    path = Path(spec)
    if path.is_dir():
        return ImageFolderSource(path, fps=fps, stride=stride, repeat=repeat)
    if not path.exists():
        raise SourceError(f"no such file, folder or camera: {spec}")
    if path.suffix.lower() in IMAGE_EXTENSIONS:  # one photo (DUSt3R-style monocular use)
        return ImageFolderSource(path, fps=fps, stride=stride, repeat=repeat)
    return VideoSource(path, stride=stride, repeat=repeat)
