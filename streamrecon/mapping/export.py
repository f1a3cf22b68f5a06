"""Exports: binary PLY and GLB point clouds, TUM trajectories (all written atomically).

* PLY: binary little-endian ``x y z`` float32, ``red green blue`` uint8, optional ``confidence``
  float32; world frame.
* GLB: glTF 2.0 binary; a ``map`` mesh with one ``POINTS`` primitive (``POSITION`` float32,
  ``COLOR_0`` normalised uint8 RGBA) and optionally a ``camera_path`` mesh of ``LINES``. glTF is y-up: the
  OpenCV world (x right, y down, z forward, of the first camera) is turned 180 degrees about x, so a
  glTF point is ``(x, -y, -z)`` of the same point in ``map.ply`` / ``trajectory.txt``
  (:data:`GLTF_FROM_OPENCV`); glTF viewers show the scene upright when the first camera was level.
* TUM: ``timestamp tx ty tz qx qy qz qw`` per line, camera-to-world, seconds (what evo reads).

numpy only (no torch), so bridges can write trajectories.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..fileio import atomic_open, atomic_write_bytes

__all__ = ["write_ply", "read_ply", "write_glb", "GLTF_FROM_OPENCV", "write_tum", "read_tum", "tum_lines", "TUM_HEADER",
           "matrix_to_quat_xyzw", "quat_xyzw_to_matrix"]


def write_ply(path: str | Path, xyz: np.ndarray, rgb: np.ndarray, conf: Optional[np.ndarray] = None) -> None:
    """Binary little-endian PLY of ``(N, 3)`` points with uint8 colours (and confidences)."""
    xyz = np.asarray(xyz, np.float32).reshape(-1, 3)
    rgb = np.asarray(rgb, np.uint8).reshape(-1, 3)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if conf is not None:
        fields.append(("confidence", "<f4"))
    data = np.empty(len(xyz), dtype=fields)
    data["x"], data["y"], data["z"] = xyz.T
    data["red"], data["green"], data["blue"] = rgb.T
    if conf is not None:
        data["confidence"] = np.asarray(conf, np.float32).reshape(-1)
    ply_types = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", "comment streamrecon map (world frame)",
              f"element vertex {len(xyz)}"]
    header += [f"property {ply_types[t]} {name}" for name, t in fields]
    header.append("end_header")
    with atomic_open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(data.tobytes())


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a binary little-endian PLY written by :func:`write_ply` (vertex element only)."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    if lines[0] != "ply" or "binary_little_endian" not in lines[1]:
        raise ValueError(f"{path}: not a binary little-endian PLY")
    n = int(next(ln.split()[2] for ln in lines if ln.startswith("element vertex")))
    types = {"float": "<f4", "uchar": "u1", "double": "<f8", "int": "<i4"}
    dtype = [(ln.split()[2], types[ln.split()[1]]) for ln in lines if ln.startswith("property")]
    data = np.frombuffer(raw, dtype=dtype, count=n, offset=end)
    return {name: data[name] for name, _ in dtype}


#: OpenCV world (y down, z forward) -> glTF (y up, z toward the viewer): a rotation of 180 deg about x
GLTF_FROM_OPENCV = np.diag([1.0, -1.0, -1.0])


def write_glb(path: str | Path, xyz: np.ndarray, rgb: np.ndarray, path_xyz: Optional[np.ndarray] = None) -> None:
    """glTF 2.0 binary with the points and the camera path (``LINES``), both given in the OpenCV world
    frame ``(N, 3)`` and written in glTF's y-up axes (:data:`GLTF_FROM_OPENCV`)."""
    flip = GLTF_FROM_OPENCV.astype(np.float32)
    xyz = np.ascontiguousarray(np.asarray(xyz, np.float32).reshape(-1, 3) @ flip)
    rgba = np.concatenate([np.asarray(rgb, np.uint8).reshape(-1, 3), np.full((len(xyz), 1), 255, np.uint8)], 1)
    blobs: list[bytes] = []
    views, accessors = [], []

    def add(data: np.ndarray, component: int, kind: str, normalized: bool = False, minmax: bool = False) -> int:
        offset = sum(len(b) for b in blobs)
        buf = data.tobytes()
        blobs.append(buf + b"\0" * (-len(buf) % 4))
        views.append({"buffer": 0, "byteOffset": offset, "byteLength": len(buf), "target": 34962})
        acc = {"bufferView": len(views) - 1, "componentType": component, "count": int(len(data)), "type": kind}
        if normalized:
            acc["normalized"] = True
        if minmax and len(data):
            acc["min"] = data.min(0).astype(float).tolist()
            acc["max"] = data.max(0).astype(float).tolist()
        accessors.append(acc)
        return len(accessors) - 1

    meshes = []
    if len(xyz):
        pos = add(xyz, 5126, "VEC3", minmax=True)
        col = add(rgba, 5121, "VEC4", normalized=True)
        meshes.append({"name": "map", "primitives": [{"attributes": {"POSITION": pos, "COLOR_0": col}, "mode": 0}]})
    if path_xyz is not None and len(path_xyz) >= 2:
        p = np.asarray(path_xyz, np.float32).reshape(-1, 3) @ flip
        segments = np.ascontiguousarray(np.stack([p[:-1], p[1:]], 1).reshape(-1, 3))  # LINES: one pair per step
        line = add(segments, 5126, "VEC3", minmax=True)
        meshes.append({"name": "camera_path", "primitives": [{"attributes": {"POSITION": line}, "mode": 1}]})
    gltf = {"asset": {"version": "2.0", "generator": "streamrecon"}, "scene": 0,
            "scenes": [{"nodes": list(range(len(meshes)))}],
            "nodes": [{"mesh": i, "name": m["name"]} for i, m in enumerate(meshes)], "meshes": meshes,
            "accessors": accessors, "bufferViews": views}
    binary = b"".join(blobs)
    if binary:
        gltf["buffers"] = [{"byteLength": len(binary)}]
    js = json.dumps(gltf, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 4)
    chunks = struct.pack("<II", len(js), 0x4E4F534A) + js
    if binary:
        chunks += struct.pack("<II", len(binary), 0x004E4942) + binary
    atomic_write_bytes(path, struct.pack("<III", 0x46546C67, 2, 12 + len(chunks)) + chunks)


def matrix_to_quat_xyzw(R: np.ndarray) -> np.ndarray:
    """``(N, 3, 3)`` rotations -> ``(N, 4)`` unit quaternions ``(x, y, z, w)`` with ``w >= 0`` (numpy only)."""
    m = np.asarray(R, np.float64).reshape(-1, 3, 3)
    m00, m11, m22 = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    cands = np.stack([
        np.stack([m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1], 1 + m00 + m11 + m22], -1),
        np.stack([1 + m00 - m11 - m22, m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0], m[:, 2, 1] - m[:, 1, 2]], -1),
        np.stack([m[:, 0, 1] + m[:, 1, 0], 1 - m00 + m11 - m22, m[:, 1, 2] + m[:, 2, 1], m[:, 0, 2] - m[:, 2, 0]], -1),
        np.stack([m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1], 1 - m00 - m11 + m22, m[:, 1, 0] - m[:, 0, 1]], -1),
    ], 1)  # candidate (x, y, z, w) from the largest of w, x, y, z
    best = np.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1).argmax(-1)
    q = cands[np.arange(len(m)), best]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return np.where(q[:, 3:] < 0, -q, q)


def quat_xyzw_to_matrix(q: np.ndarray) -> np.ndarray:
    """``(N, 4)`` quaternions ``(x, y, z, w)`` (any norm) -> ``(N, 3, 3)`` rotations (numpy only)."""
    q = np.asarray(q, np.float64).reshape(-1, 4)
    x, y, z, w = q.T
    s = 2.0 / (q * q).sum(-1)
    return np.stack([
        1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w),
        s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w),
        s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y),
    ], -1).reshape(-1, 3, 3)


TUM_HEADER = "# timestamp tx ty tz qx qy qz qw (camera-to-world, streamrecon)\n"


def tum_lines(stamps: Sequence[float], T_wc: np.ndarray) -> str:
    """TUM text of ``(N, 4, 4)`` camera-to-world poses: one ``t tx ty tz qx qy qz qw`` line each."""
    T = np.asarray(T_wc, np.float64).reshape(-1, 4, 4)
    if len(T) != len(stamps):
        raise ValueError(f"{len(stamps)} stamps for {len(T)} poses")
    if not len(T):
        return ""
    q = matrix_to_quat_xyzw(T[:, :3, :3])
    return "".join(f"{t:.9f} {Ti[0, 3]:.9g} {Ti[1, 3]:.9g} {Ti[2, 3]:.9g} {qi[0]:.9g} {qi[1]:.9g} {qi[2]:.9g} {qi[3]:.9g}\n"
                   for t, Ti, qi in zip(stamps, T, q))


def write_tum(path: str | Path, stamps: Sequence[float], T_wc: np.ndarray) -> None:
    """TUM trajectory: one ``t tx ty tz qx qy qz qw`` line per pose (camera-to-world), written atomically."""
    text = tum_lines(stamps, T_wc)
    with atomic_open(path, "w") as f:
        f.write(TUM_HEADER)
        f.write(text)


def read_tum(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a TUM trajectory: ``(stamps (N,), T_wc (N, 4, 4))``."""
    rows = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    data = np.array(rows, dtype=np.float64).reshape(-1, 8)
    T = np.tile(np.eye(4), (len(data), 1, 1))
    T[:, :3, :3] = quat_xyzw_to_matrix(data[:, 4:8])
    T[:, :3, 3] = data[:, 1:4]
    return data[:, 0], T
