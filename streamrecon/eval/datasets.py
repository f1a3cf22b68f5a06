"""Sequences with ground truth for ``streamrecon eval``: our synthetic folders, TUM RGB-D, 7-Scenes,
SUN3D/3DMatch fragments, KITTI odometry, APC (apc-vision-toolbox) scenes.

* synthetic (``streamrecon.synth.dataset`` format): ``rgb/``, ``depth/*.npy``, ``poses.txt``, ``intrinsics.txt``;
* TUM RGB-D: ``rgb.txt``, ``depth.txt`` (PNG, depth x 5000), ``groundtruth.txt``; frames are associated
  by nearest timestamp (<= 20 ms); intrinsics default to TUM's ROS defaults (525, 525, 319.5, 239.5);
* 7-Scenes: ``frame-XXXXXX.color.(png|jpg)``, ``.depth.png`` (mm; 0 and 65535 invalid),
  ``.pose.txt`` (4x4 camera-to-world); fx = fy = 585, cx = 320, cy = 240;
* SUN3D / 3DMatch (``sun3d``): the 7-Scenes layout (depth mm, 0 invalid) plus ``camera-intrinsics.txt``
  (3x3 matrix) in the folder or its parent, which is what tells the two apart; stamps = frame number / 30;
* KITTI odometry (``kitti``): ``image_l/`` (or ``image_0/``) grey PNGs (stacked to RGB), ``poses.txt``
  (3x4 row-major camera-to-world per line), ``calib.txt`` (``P0``, labelled or not, gives K), stamps from
  ``times*.txt`` when it has a line per frame, else frame / 10 s; no depth (``has_depth=False``, zeros);
* APC (``apc``): ``frame-XXXXXX.color.png``, ``.depth.png`` (uint16 circularly shifted right by 3 bits,
  deci-millimetres: ``d = ((v << 13) | (v >> 3)) & 0xFFFF``, metres = d / 10000, 0 invalid), ``cam.info.txt``
  ("Color camera intrinsic matrix" and one "Camera-to-world extrinsic matrix (camera pose) for frame-XXXXXX"
  per view); stamps = view index (a multi-view set, not a video). ``raw/`` (unregistered depth) is ignored.

``K`` given to :func:`find_sequences` overrides the default intrinsics of TUM / 7-Scenes only; the other
formats read theirs from their calibration files.

A dataset folder may be one sequence or hold sequences in sub-folders (searched three levels deep).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

__all__ = ["EvalSequence", "find_sequences", "detect_format", "FORMATS", "REAL_FORMATS"]

#: every format :func:`find_sequences` reads
FORMATS = ("synthetic", "tum", "7scenes", "sun3d", "kitti", "apc")
#: the real development formats (``streamrecon eval`` scores them per pose backend)
REAL_FORMATS = ("sun3d", "kitti", "apc")


@dataclass
class EvalSequence:
    """Frames are loaded on demand.

    Attributes:
        name: sequence name; fmt: one of :data:`FORMATS`.
        T_wc: ``(N, 4, 4)`` ground-truth camera-to-world; K: ``(3, 3)``; stamps: ``(N,)`` seconds.
        has_depth: ``False`` when the dataset has no depth ground truth (the depth loader gives zeros).
        dynamic_loader: ``i -> (H, W)`` bool ground-truth motion mask (synthetic sets with movers), or ``None``.
    """

    name: str
    fmt: str
    rgb_loader: Callable[[int], np.ndarray]
    n: int
    depth_loader: Callable[[int], np.ndarray]
    T_wc: np.ndarray
    K: np.ndarray
    stamps: np.ndarray
    has_depth: bool = True
    dynamic_loader: Optional[Callable[[int], np.ndarray]] = None

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

    def dynamic(self, i: int) -> Optional[np.ndarray]:
        """``(H, W)`` bool: pixels on moving objects (``None`` without that ground truth)."""
        return None if self.dynamic_loader is None else self.dynamic_loader(i)

    def there_and_back(self) -> "EvalSequence":
        """The camera goes the path and returns: frames ``0, 2, 4, ...`` then the odd frames backwards
        (``..., 3, 1``), so no image is seen twice but the return revisits every place -- a loop for
        the loop closer on sequences that have none."""
        idx = np.r_[np.arange(0, self.n, 2), np.arange(self.n - 1 - (self.n % 2 == 1), 0, -2)]
        idx = np.asarray(idx, int)
        dt = float(np.median(np.diff(self.stamps))) if self.n > 1 else 1.0
        return EvalSequence(f"{self.name} (there and back)", self.fmt, lambda i: self.rgb_loader(int(idx[i])), len(idx),
                            lambda i: self.depth_loader(int(idx[i])), self.T_wc[idx], self.K,
                            np.arange(len(idx)) * 2 * dt, self.has_depth,
                            None if self.dynamic_loader is None else lambda i: self.dynamic_loader(int(idx[i])))


def _image_loader(paths: list[Path]) -> Callable[[int], np.ndarray]:
    def load(i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(paths[i]) as im:
            return np.array(im.convert("RGB"))

    return load


def _unshift3(v: np.ndarray) -> np.ndarray:
    """APC depth PNGs: undo the circular right shift by 3 bits of a uint16 image."""
    v = v.astype(np.uint32)
    return ((v << 13) | (v >> 3)) & 0xFFFF


def _png_depth(path: Path, scale: float, invalid: tuple = (0,), decode: Optional[Callable] = None) -> np.ndarray:
    import cv2

    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"cannot read depth image {path}")
    if decode is not None:
        raw = decode(raw)
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
    dynamic = None
    if (d / "dynamic").is_dir():  # ground-truth motion masks (tools/make_synth_eval.py dynamic)
        masks = [d / "dynamic" / f"{p.stem}.png" for p in rgb]

        def dynamic(i: int) -> np.ndarray:
            from PIL import Image

            with Image.open(masks[i]) as im:
                return np.array(im.convert("L")) > 127

    return EvalSequence(d.name, "synthetic", _image_loader(rgb), len(rgb), lambda i: np.load(depth[i]), T,
                        np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]), stamps, dynamic_loader=dynamic)


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


def _read_matrix(path: Path) -> np.ndarray:
    """A whitespace-separated matrix (``#`` comments allowed)."""
    return np.loadtxt(path, comments="#", ndmin=2)


def _frame_folder(d: Path, fmt: str, K: np.ndarray, invalid: tuple, stamp: Callable[[int, str], float]) -> EvalSequence:
    """7-Scenes / SUN3D layout: ``frame-XXXXXX.color.(png|jpg)``, ``.depth.png`` (mm), ``.pose.txt`` (4x4 c2w).
    ``stamp(i, stem)`` gives frame ``i``'s time."""
    color = sorted(list(d.glob("frame-*.color.png")) + list(d.glob("frame-*.color.jpg")))
    stems = [p.name.split(".")[0] for p in color]
    T = np.stack([np.loadtxt(d / f"{s}.pose.txt").reshape(4, 4) for s in stems])
    depth = [d / f"{s}.depth.png" for s in stems]
    return EvalSequence(d.name, fmt, _image_loader(color), len(color),
                        lambda i: _png_depth(depth[i], 1000.0, invalid), T, K,
                        np.array([stamp(i, s) for i, s in enumerate(stems)], dtype=np.float64))


def _sevenscenes(d: Path, K: Optional[np.ndarray]) -> EvalSequence:
    K = K if K is not None else np.array([[585.0, 0, 320.0], [0, 585.0, 240.0], [0, 0, 1]])
    return _frame_folder(d, "7scenes", K, (0, 65535), lambda i, _s: i / 30.0)


def _sun3d_intrinsics(d: Path) -> Optional[Path]:
    for folder in (d, d.parent):
        if (folder / "camera-intrinsics.txt").is_file():
            return folder / "camera-intrinsics.txt"
    return None


def _sun3d(d: Path) -> EvalSequence:
    path = _sun3d_intrinsics(d)
    if path is None:
        raise ValueError(f"{d}: no camera-intrinsics.txt in the folder or its parent")
    K = _read_matrix(path)
    if K.shape != (3, 3):
        raise ValueError(f"{path}: expected a 3x3 matrix, got shape {K.shape}")
    # the source has no timestamps: frame number / 30 (as the derived groundtruth_tum_*.txt files)
    return _frame_folder(d, "sun3d", K, (0,), lambda _i, s: int(s.split("-")[1]) / 30.0)


def _kitti_images(d: Path) -> Optional[Path]:
    for name in ("image_l", "image_0"):
        if (d / name).is_dir():
            return d / name
    return None


def _kitti_K(path: Path) -> np.ndarray:
    """K from ``P0`` of a KITTI ``calib.txt`` (``P0: 12 numbers``, or unlabelled: the first line)."""
    rows = {}
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        label, _, rest = line.partition(":") if ":" in line else (f"P{n}", "", line)
        rows[label.strip()] = [float(v) for v in rest.split()]
    if "P0" not in rows or len(rows["P0"]) != 12:
        raise ValueError(f"{path}: no P0 line with 12 numbers")
    return np.array(rows["P0"]).reshape(3, 4)[:, :3].copy()


def _kitti(d: Path) -> EvalSequence:
    from PIL import Image

    folder = _kitti_images(d)
    if folder is None or not (d / "poses.txt").is_file() or not (d / "calib.txt").is_file():
        raise ValueError(f"{d}: a KITTI sequence needs image_l/ (or image_0/), poses.txt and calib.txt")
    images = sorted(folder.glob("*.png"))
    poses = np.loadtxt(d / "poses.txt", ndmin=2)
    if poses.shape[1] != 12:
        raise ValueError(f"{d / 'poses.txt'}: expected 12 numbers per line, got {poses.shape[1]}")
    if len(images) != len(poses):
        raise ValueError(f"{d}: {len(images)} images but {len(poses)} poses")
    T = np.tile(np.eye(4), (len(poses), 1, 1))
    T[:, :3, :] = poses.reshape(-1, 3, 4)
    stamps = np.arange(len(images)) / 10.0
    for t in sorted(d.glob("times*.txt")):
        values = np.loadtxt(t, ndmin=1)
        if values.ndim == 1 and len(values) >= len(images):
            stamps = values[: len(images)].astype(np.float64)
            break
    with Image.open(images[0]) as im:
        w, h = im.size
    return EvalSequence(d.name, "kitti", _image_loader(images), len(images),
                        lambda i: np.zeros((h, w), np.float32), T, _kitti_K(d / "calib.txt"), stamps,
                        has_depth=False)


def _apc_info(path: Path) -> dict[str, np.ndarray]:
    """``cam.info.txt``: ``# title`` lines, each followed by the rows of its matrix."""
    blocks: dict[str, list[list[float]]] = {}
    title = None
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#"):
            title = text.lstrip("#").strip()
            blocks[title] = []
        elif text and title is not None:
            try:
                blocks[title].append([float(v) for v in text.split()])
            except ValueError:
                pass  # a text line under a title (not a matrix)
    return {k: np.array(v) for k, v in blocks.items() if v}


def _apc(d: Path) -> EvalSequence:
    if not (d / "cam.info.txt").is_file():
        raise ValueError(f"{d}: an APC scene needs cam.info.txt")
    info = _apc_info(d / "cam.info.txt")
    K = info.get("Color camera intrinsic matrix")
    if K is None or K.shape != (3, 3):
        raise ValueError(f"{d / 'cam.info.txt'}: no 3x3 'Color camera intrinsic matrix'")
    color = sorted(d.glob("frame-*.color.png"))
    stems = [p.name.split(".")[0] for p in color]
    T = []
    for s in stems:
        M = info.get(f"Camera-to-world extrinsic matrix (camera pose) for {s}")
        if M is None or M.shape != (4, 4):
            raise ValueError(f"{d / 'cam.info.txt'}: no 4x4 camera pose for {s}")
        T.append(M)
    depth = [d / f"{s}.depth.png" for s in stems]
    return EvalSequence(d.name, "apc", _image_loader(color), len(color),
                        lambda i: _png_depth(depth[i], 10000.0, (0,), _unshift3), np.stack(T), K,
                        np.arange(len(stems), dtype=np.float64))


def detect_format(d: Path) -> Optional[str]:
    if (d / "poses.txt").is_file() and (d / "rgb").is_dir() and (d / "intrinsics.txt").is_file():
        return "synthetic"
    if (d / "rgb.txt").is_file() and (d / "depth.txt").is_file() and (d / "groundtruth.txt").is_file():
        return "tum"
    if (d / "poses.txt").is_file() and (d / "calib.txt").is_file() and _kitti_images(d) is not None:
        return "kitti"
    if (d / "cam.info.txt").is_file() and any(d.glob("frame-*.color.png")):
        return "apc"
    if any(d.glob("frame-*.pose.txt")):
        return "sun3d" if _sun3d_intrinsics(d) is not None else "7scenes"
    return None


def find_sequences(root: str | Path, fmt: Optional[str] = None, K: Optional[np.ndarray] = None) -> list[EvalSequence]:
    """Every sequence under ``root`` (``fmt`` forces a format; ``K`` overrides TUM/7-Scenes intrinsics)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r} (one of {', '.join(FORMATS)})")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    readers = {"synthetic": lambda d: _synthetic(d), "tum": lambda d: _tum(d, K), "7scenes": lambda d: _sevenscenes(d, K),
               "sun3d": _sun3d, "kitti": _kitti, "apc": _apc}
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
        raise ValueError(f"no sequences found under {root} (expected our synthetic folders, TUM RGB-D, "
                         "7-Scenes, SUN3D/3DMatch, KITTI odometry or APC)")
    return found
