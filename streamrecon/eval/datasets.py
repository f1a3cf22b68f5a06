"""Sequences with ground truth for ``streamrecon eval``: our synthetic folders, TUM RGB-D, 7-Scenes.

* synthetic (``streamrecon.synth.dataset`` format): ``rgb/``, ``depth/*.npy``, ``poses.txt``, ``intrinsics.txt``;
* TUM RGB-D: ``rgb.txt``, ``depth.txt`` (PNG, depth x 5000), ``groundtruth.txt``; frames are associated
  by nearest timestamp (<= 20 ms); intrinsics default to TUM's ROS defaults (525, 525, 319.5, 239.5);
* 7-Scenes: ``frame-XXXXXX.color.(png|jpg)``, ``.depth.png`` (mm; 0 and 65535 invalid),
  ``.pose.txt`` (4x4 camera-to-world); fx = fy = 585, cx = 320, cy = 240.

A dataset folder may be one sequence or hold sequences in sub-folders (searched three levels deep).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

__all__ = ["EvalSequence", "find_sequences", "detect_format"]


@dataclass
class EvalSequence:
    """Frames are loaded on demand.

    Attributes:
        name: sequence name; fmt: ``synthetic``, ``tum`` or ``7scenes``.
        T_wc: ``(N, 4, 4)`` ground-truth camera-to-world; K: ``(3, 3)``; stamps: ``(N,)`` seconds.
    """

    name: str
    fmt: str
    rgb_loader: Callable[[int], np.ndarray]
    n: int
    depth_loader: Callable[[int], np.ndarray]
    T_wc: np.ndarray
    K: np.ndarray
    stamps: np.ndarray

    def __len__(self) -> int:
        return self.n

    def rgb(self, i: int) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB."""
        return self.rgb_loader(i)

    @classmethod
    def from_arrays(cls, name: str, rgb: np.ndarray, depth: np.ndarray, T_wc: np.ndarray, K: np.ndarray,
                    fps: float = 30.0) -> "EvalSequence":
        """A sequence held in memory (``rgb`` ``(N, H, W, 3)``, ``depth`` ``(N, H, W)``)."""
        return cls(name, "synthetic", lambda i: rgb[i], len(rgb), lambda i: depth[i], T_wc, K, np.arange(len(rgb)) / fps)

    def depth(self, i: int) -> np.ndarray:
        """``(H, W)`` metres, 0 where invalid."""
        return self.depth_loader(i)


def _image_loader(paths: list[Path]) -> Callable[[int], np.ndarray]:
    def load(i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(paths[i]) as im:
            return np.array(im.convert("RGB"))

    return load


def _png_depth(path: Path, scale: float, invalid: tuple = (0,)) -> np.ndarray:
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"cannot read depth image {path}")
    d = raw.astype(np.float32) / scale
    for v in invalid:
        d[raw == v] = 0
    return d


def _synthetic(d: Path) -> EvalSequence:
    from ..mapping import read_tum

    rgb = sorted((d / "rgb").glob("*.png"))
    stamps, T = read_tum(d / "poses.txt")
    fx, fy, cx, cy = (float(v) for v in (d / "intrinsics.txt").read_text().split())
    if len(rgb) != len(T):
        raise ValueError(f"{d}: {len(rgb)} images but {len(T)} poses")
    depth = [d / "depth" / f"{p.stem}.npy" for p in rgb]
    return EvalSequence(d.name, "synthetic", _image_loader(rgb), len(rgb), lambda i: np.load(depth[i]), T,
                        np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]), stamps)


def _read_list(path: Path) -> list[tuple[float, list[str]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            parts = line.split()
            rows.append((float(parts[0]), parts[1:]))
    return rows


def _tum(d: Path, K: Optional[np.ndarray], max_dt: float = 0.02) -> EvalSequence:
    from ..mapping.export import quat_xyzw_to_matrix

    rgb, depth, gt = _read_list(d / "rgb.txt"), _read_list(d / "depth.txt"), _read_list(d / "groundtruth.txt")
    d_t = np.array([t for t, _ in depth])
    g_t = np.array([t for t, _ in gt])
    g = np.array([[float(v) for v in row] for _, row in gt]).reshape(-1, 7)
    keep = []
    for t, row in rgb:
        i, j = int(np.abs(d_t - t).argmin()), int(np.abs(g_t - t).argmin())
        if abs(d_t[i] - t) <= max_dt and abs(g_t[j] - t) <= max_dt:
            keep.append((t, d / row[0], d / depth[i][1][0], j))
    if not keep:
        raise ValueError(f"{d}: no RGB frame has depth and ground truth within {max_dt * 1000:.0f} ms")
    T = np.tile(np.eye(4), (len(keep), 1, 1))
    idx = [k[3] for k in keep]
    T[:, :3, :3] = quat_xyzw_to_matrix(g[idx, 3:7])
    T[:, :3, 3] = g[idx, :3]
    K = K if K is not None else np.array([[525.0, 0, 319.5], [0, 525.0, 239.5], [0, 0, 1]])
    depth_paths = [k[2] for k in keep]
    return EvalSequence(d.name, "tum", _image_loader([k[1] for k in keep]), len(keep),
                        lambda i: _png_depth(depth_paths[i], 5000.0), T, K,
                        np.array([k[0] for k in keep]))


def _sevenscenes(d: Path, K: Optional[np.ndarray]) -> EvalSequence:
    color = sorted(list(d.glob("frame-*.color.png")) + list(d.glob("frame-*.color.jpg")))
    stems = [p.name.split(".")[0] for p in color]
    T = np.stack([np.loadtxt(d / f"{s}.pose.txt").reshape(4, 4) for s in stems])
    K = K if K is not None else np.array([[585.0, 0, 320.0], [0, 585.0, 240.0], [0, 0, 1]])
    depth = [d / f"{s}.depth.png" for s in stems]
    return EvalSequence(d.name, "7scenes", _image_loader(color), len(color),
                        lambda i: _png_depth(depth[i], 1000.0, (0, 65535)), T, K,
                        np.arange(len(stems)) / 30.0)


def detect_format(d: Path) -> Optional[str]:
    if (d / "poses.txt").is_file() and (d / "rgb").is_dir() and (d / "intrinsics.txt").is_file():
        return "synthetic"
    if (d / "rgb.txt").is_file() and (d / "depth.txt").is_file() and (d / "groundtruth.txt").is_file():
        return "tum"
    if any(d.glob("frame-*.pose.txt")):
        return "7scenes"
    return None


def find_sequences(root: str | Path, fmt: Optional[str] = None, K: Optional[np.ndarray] = None) -> list[EvalSequence]:
    """Every sequence under ``root`` (``fmt`` forces a format; ``K`` overrides TUM/7-Scenes intrinsics)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    readers = {"synthetic": lambda d: _synthetic(d), "tum": lambda d: _tum(d, K), "7scenes": lambda d: _sevenscenes(d, K)}
    found: list[EvalSequence] = []

    def visit(d: Path, depth: int) -> None:
        kind = detect_format(d)
        if kind is not None:
            found.append(readers[fmt or kind](d))
            return
        if depth < 3:
            for sub in sorted(p for p in d.iterdir() if p.is_dir()):
                visit(sub, depth + 1)

    visit(root, 0)
    if not found:
        raise ValueError(f"no sequences found under {root} (expected our synthetic folders, TUM RGB-D or 7-Scenes)")
    return found
