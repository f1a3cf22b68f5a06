"""Raymap probes: virtual cameras queried against the current state (``--probe SPEC``).

Grammar: ``WHAT[@WHEN]``

* ``WHAT`` = ``orbit`` or ``orbit:N`` (N cameras on a circle around the map, looking at its centre,
  at the height of the latest camera, the first one at the latest camera's bearing), or a path to a
  JSON file of cameras: ``[{"name": ..., "T_wc": 4x4, "K": 3x3 (optional), "size": [H, W] (optional)}]``
  (or ``{"cameras": [...]}``); poses are camera-to-world in the run's global frame (OpenCV axes).
* ``WHEN`` = ``end`` (default), ``every:N`` (every N-th processed frame), or frame indices ``10,50,90``.

Intrinsics and size default to the sequence's latest estimate (model resolution), not a fixed field
of view.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["ProbeSpec", "VirtualCamera", "parse_probe", "orbit_cameras", "look_at", "valid_probe_name"]


@dataclass(frozen=True)
class VirtualCamera:
    """Attributes:
        name: used in file and entity names.
        T_wc: ``(4, 4)`` camera-to-world (global frame).
        K: ``(3, 3)`` intrinsics, or ``None`` for the sequence's estimate.
        hw: ``(H, W)``, or ``None`` for the latest model input size.
    """

    name: str
    T_wc: np.ndarray
    K: Optional[np.ndarray] = None
    hw: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class ProbeSpec:
    """A parsed ``--probe`` value."""

    kind: str  # "orbit" or "file"
    count: int = 8
    path: Optional[Path] = None
    at_end: bool = True
    every: int = 0
    frames: tuple[int, ...] = field(default_factory=tuple)
    text: str = ""

    def due(self, frame_index: int) -> bool:
        """Whether the probe runs after processed frame ``frame_index`` (0-based)."""
        if self.every and (frame_index + 1) % self.every == 0:
            return True
        return frame_index in self.frames

    def cameras(self, map_points: np.ndarray, T_wc_latest: np.ndarray) -> list[VirtualCamera]:
        if self.kind == "orbit":
            return orbit_cameras(map_points, T_wc_latest, self.count)
        return _load_cameras(self.path)


def parse_probe(text: str) -> ProbeSpec:
    """Parse ``WHAT[@WHEN]`` (see module docstring); raises ``ValueError`` with the reason."""
    what, _, when = text.strip().partition("@")
    kw: dict = {"text": text}
    if what == "orbit" or what.startswith("orbit:"):
        kw["kind"] = "orbit"
        if what.startswith("orbit:"):
            try:
                kw["count"] = int(what[6:])
            except ValueError:
                raise ValueError(f"--probe {text!r}: orbit:N needs an integer N") from None
            if kw["count"] < 1:
                raise ValueError(f"--probe {text!r}: orbit needs at least one camera")
    else:
        path = Path(what)
        if path.suffix.lower() != ".json":
            raise ValueError(f"--probe {text!r}: expected 'orbit', 'orbit:N' or a .json file of cameras")
        if not path.is_file():
            raise ValueError(f"--probe {text!r}: camera file not found: {path}")
        _load_cameras(path)  # validate now, not at the end of a long run
        kw.update(kind="file", path=path)
    when = when.strip()
    if when in ("", "end"):
        kw["at_end"] = True
    elif when.startswith("every:"):
        try:
            kw["every"] = int(when[6:])
        except ValueError:
            raise ValueError(f"--probe {text!r}: every:N needs an integer N") from None
        kw["at_end"] = False
    else:
        try:
            kw["frames"] = tuple(int(v) for v in when.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--probe {text!r}: WHEN must be 'end', 'every:N' or frame indices like 10,20") from None
        kw["at_end"] = False
    return ProbeSpec(**kw)


def _load_cameras(path: Path) -> list[VirtualCamera]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read probe cameras from {path}: {e}") from None
    items = data.get("cameras") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a non-empty list of cameras")
    cams = []
    for i, item in enumerate(items):
        try:
            T = np.asarray(item["T_wc"], dtype=np.float64)
            K = np.asarray(item["K"], dtype=np.float64) if item.get("K") is not None else None
            hw = tuple(int(v) for v in item["size"]) if item.get("size") is not None else None
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: camera {i}: {e}") from None
        if T.shape != (4, 4) or (K is not None and K.shape != (3, 3)) or (hw is not None and len(hw) != 2):
            raise ValueError(f"{path}: camera {i}: T_wc must be 4x4, K 3x3, size [H, W]")
        if hw is not None and (hw[0] % 16 or hw[1] % 16):
            raise ValueError(f"{path}: camera {i}: size {hw} must be multiples of 16")
        name = item.get("name", f"cam{i}")
        if not valid_probe_name(name):
            raise ValueError(f"{path}: camera {i}: name {str(name)[:40]!r} must be 1-64 letters, digits, '_', '.', "
                             "'-' (it names files under probes/)")
        cams.append(VirtualCamera(name=name, T_wc=T, K=K, hw=hw))
    return cams


def valid_probe_name(name) -> bool:
    """A probe camera's name: it names files (``probes/<name>_NNNNNN.npz``) and a viewer entity."""
    from .snapshot.store import valid_name

    return valid_name(name)


_DOWN = np.array([0.0, 1.0, 0.0])  # OpenCV world: y points down


def look_at(position: np.ndarray, target: np.ndarray, down: np.ndarray = _DOWN) -> np.ndarray:
    """``(4, 4)`` OpenCV camera-to-world at ``position`` looking at ``target`` (image y along ``down``)."""
    z = target - position
    z = z / max(np.linalg.norm(z), 1e-12)
    x = np.cross(down, z)
    if np.linalg.norm(x) < 1e-9:  # looking straight along the down axis
        x = np.cross(np.array([0.0, 0.0, 1.0]), z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, position
    return T


def orbit_cameras(map_points: np.ndarray, T_wc_latest: np.ndarray, count: int) -> list[VirtualCamera]:
    """``count`` cameras on a horizontal circle (world x-z plane; OpenCV y is down) around the map centre."""
    cam = T_wc_latest[:3, 3]
    centre = np.median(map_points, axis=0) if len(map_points) else cam + T_wc_latest[:3, 2]
    offset = cam - centre
    radius = float(np.hypot(offset[0], offset[2]))
    if radius < 1e-6:
        radius = max(float(np.linalg.norm(offset)), 1.0)
    start = math.atan2(offset[0], offset[2])
    cams = []
    for i in range(count):
        a = start + 2 * math.pi * i / count
        pos = np.array([centre[0] + radius * math.sin(a), cam[1], centre[2] + radius * math.cos(a)])
        cams.append(VirtualCamera(name=f"orbit{i:02d}", T_wc=look_at(pos, centre)))
    return cams
