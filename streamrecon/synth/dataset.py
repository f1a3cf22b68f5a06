"""Synthetic sequences: rendering, the on-disk folder format, and training batches.

Folder format of one sequence (``write_sequence`` / ``read_sequence``; ``streamrecon eval`` reads it)::

    <seq>/rgb/000000.png        uint8 RGB frames, in order
    <seq>/depth/000000.npy      float32 metric z-depth per pixel (0 = invalid)
    <seq>/poses.txt             TUM: t tx ty tz qx qy qz qw, camera-to-world (OpenCV axes), t = index / fps
    <seq>/intrinsics.txt        fx fy cx cy (pixels, same for every frame)
    <seq>/virtual/rgb|depth|poses.txt   held-out virtual views (never in the stream) for raymap queries
    <seq>/dynamic/000000.png    uint8 ground-truth motion mask, 255 on moving objects (scenes with movers only)
    <seq>/meta.json             seed, trajectory kind, size, fps, scene summary

Training batches (:class:`SyntheticStream`) are rendered in memory and never touch the disk.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

import numpy as np
import torch
from torch import Tensor

from ..fileio import atomic_write_text
from .render import render
from .scene import random_scene
from .trajectory import KINDS, intrinsics, make_trajectory

__all__ = ["SynthConfig", "render_sequence", "write_sequence", "read_sequence", "SyntheticStream", "make_dataset"]


@dataclass(frozen=True)
class SynthConfig:
    """Args:
        height, width: rendered image size.
        frames: frames per sequence.
        hfov: range of horizontal fields of view (degrees).
        kinds: trajectory kinds to draw from.
        moving: number of moving objects per scene.
        speed: range of a moving object's speed (metres per frame).
        movers_in_view: place each moving object where the camera looks at some frame, crossing the
            view (evaluation sets for motion masks; otherwise movers are placed like any object).
        virtual: held-out virtual views per sequence.
        supersample: colour sub-pixel rays per axis.
        step: camera step per frame (metres) for moving trajectories.
        textures: photographs some surfaces carry (:mod:`streamrecon.synth.textures`: ``"skimage"``,
            a directory, ``""`` none); texture_prob: the chance a surface carries one.
        furniture: range of the number of furniture pieces per room (:mod:`.furniture`; ``(0, 0)``: none).
        pitch: range of the camera's starting pitch (radians, positive up); ``None``: nearly level
            (:func:`~streamrecon.synth.trajectory.make_trajectory`).
        aim_prob: the chance a sequence starts looking at a piece of furniture (rooms that have some).
        shadows: the lights' radius (metres) for soft cast shadows and corner occlusion
            (:func:`~streamrecon.synth.render.render`); ``0``: none.
    """

    height: int = 112
    width: int = 160
    frames: int = 30
    hfov: tuple = (55.0, 75.0)
    kinds: tuple = KINDS
    moving: int = 0
    speed: tuple = (0.01, 0.03)
    movers_in_view: bool = False
    virtual: int = 4
    supersample: int = 2
    step: float = 0.08
    textures: str = ""
    texture_prob: float = 0.5
    furniture: tuple = (0, 0)
    pitch: Optional[tuple] = None
    aim_prob: float = 0.0
    shadows: float = 0.0


def render_sequence(seed: int, cfg: SynthConfig = SynthConfig(), frames: Optional[int] = None,
                    on_view: Optional[Callable[[], None]] = None) -> dict:
    """Render one sequence (deterministic by ``seed``); ``on_view()`` is called after each rendered view
    (progress bars: ``frames + cfg.virtual`` calls).

    Returns:
        ``rgb`` ``(N, H, W, 3)`` uint8, ``depth`` ``(N, H, W)`` float32, ``valid`` ``(N, H, W)`` bool,
        ``dynamic`` ``(N, H, W)`` bool (pixels on a moving object: the ground-truth motion mask),
        ``T_wc`` ``(N, 4, 4)`` float64, ``K`` ``(3, 3)`` float64, ``kind``, ``seed``, and ``virtual``
        (the same keys for held-out views near the path).
    """
    n = frames or cfg.frames
    g = torch.Generator().manual_seed(seed)
    from .textures import load_textures

    scene = random_scene(seed, moving=cfg.moving, speed=cfg.speed, textures=load_textures(cfg.textures),
                         texture_prob=cfg.texture_prob, furniture=tuple(cfg.furniture))
    kind = cfg.kinds[int(torch.randint(len(cfg.kinds), (1,), generator=g))]
    hfov = cfg.hfov[0] + (cfg.hfov[1] - cfg.hfov[0]) * float(torch.rand(1, generator=g))
    K = intrinsics(cfg.height, cfg.width, hfov)
    aim = None
    if cfg.aim_prob > 0 and scene.furniture:  # its own generator: other draws stay as they were
        ga = torch.Generator().manual_seed(seed * 13 + 5)
        if float(torch.rand(1, generator=ga)) < cfg.aim_prob:
            aim = scene.furniture[int(torch.randint(len(scene.furniture), (1,), generator=ga))].focus
    T = make_trajectory(scene, kind, n, seed=seed + 1, step=cfg.step,
                        pitch=tuple(cfg.pitch) if cfg.pitch is not None else None, aim=aim)
    if cfg.moving and cfg.movers_in_view:
        _place_movers(scene, T, cfg.moving, torch.Generator().manual_seed(seed + 2))
    def view(T_wc, frame: int) -> dict:
        v = render(scene, T_wc, K, cfg.height, cfg.width, frame=frame, supersample=cfg.supersample,
                   shadows=cfg.shadows)
        if on_view is not None:
            on_view()
        return v

    views = [view(T[i], i) for i in range(n)]
    out = {"rgb": torch.stack([v["rgb"] for v in views]).numpy(), "depth": torch.stack([v["depth"] for v in views]).numpy(),
           "valid": torch.stack([v["valid"] for v in views]).numpy(),
           "dynamic": torch.stack([v["dynamic"] for v in views]).numpy(), "T_wc": T.numpy(), "K": K.numpy(), "kind": kind,
           "seed": seed, "hfov": hfov}
    vT = []
    for _ in range(cfg.virtual):  # off the path: sideways / up-down shift and a turn
        i = int(torch.randint(n, (1,), generator=g))
        Tv = T[i].clone()
        shift = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([0.6, 0.2, 0.4], dtype=torch.float64)
        yaw = (float(torch.rand(1, generator=g)) - 0.5) * 0.6
        c, s = math.cos(yaw), math.sin(yaw)
        Tv[:3, :3] = Tv[:3, :3] @ torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)
        Tv[:3, 3] += Tv[:3, :3] @ shift
        if not scene.free_space_ok(Tv[:3, 3].float(), margin=0.3):
            Tv = T[i].clone()
        vT.append(Tv)
    vviews = [view(Tv, 0) for Tv in vT]
    hw = (cfg.height, cfg.width)
    out["virtual"] = {
        "rgb": np.stack([v["rgb"].numpy() for v in vviews]) if vviews else np.zeros((0, *hw, 3), np.uint8),
        "depth": np.stack([v["depth"].numpy() for v in vviews]) if vviews else np.zeros((0, *hw), np.float32),
        "T_wc": torch.stack(vT).numpy() if vT else np.zeros((0, 4, 4)),
    }
    out["scene"] = {"room": scene.room.tolist(), "objects": len(scene.objects), "lights": len(scene.lights),
                    "moving": cfg.moving}
    return out


def _place_movers(scene, T: Tensor, moving: int, g: torch.Generator, tries: int = 30) -> None:
    """Move the first ``moving`` objects of ``scene`` (in place) so each crosses the camera's view.

    For each mover a frame ``i`` of the trajectory ``T`` ``(N, 4, 4)`` (camera-to-world) is drawn; the
    object is put 1.5-3 m ahead of that camera (on its floor height) and given the same speed, moving
    sideways across the view; positions that come too close to the camera at any frame or leave the
    room are drawn again (after ``tries`` the object stays where it was).
    """
    n = len(T)
    lo, hi = scene.bounds()
    cams = T[:, :3, 3].float()

    def u(a: float, b: float) -> float:
        return a + (b - a) * torch.rand(1, generator=g).item()

    for prim in scene.objects[:moving]:
        speed = float(prim.velocity.norm()) or 0.02
        reach = float(prim.size.max()) * (1.5 if prim.kind == "box" else 1.0)
        for _ in range(tries):
            i = int(torch.randint(n // 4, max(n // 4 + 1, 3 * n // 4), (1,), generator=g))
            fwd = T[i, :3, 2].float() * torch.tensor([1.0, 0.0, 1.0])
            if float(fwd.norm()) < 1e-3:
                continue
            fwd = fwd / fwd.norm()
            right = torch.tensor([-fwd[2], 0.0, fwd[0]])
            centre = cams[i] + fwd * u(1.5, 3.0) + right * u(-0.5, 0.5)
            centre[1] = prim.center[1]
            vel = right * speed * (1 if u(0, 1) < 0.5 else -1)
            path = centre[None] + (torch.arange(n, dtype=torch.float32) - i)[:, None] * vel[None]
            inside = bool(((path - lo) > reach).all() and ((hi - path) > reach)[:, [0, 2]].all())
            gap = ((path - cams) * torch.tensor([1.0, 0.0, 1.0])).norm(dim=1).min()
            if inside and float(gap) > reach + 0.6:
                prim.center, prim.velocity = path[0].clone(), vel
                break


def _write_views(d: Path, rgb: np.ndarray, depth: np.ndarray, T: np.ndarray, fps: float) -> None:
    import cv2

    from ..mapping import write_tum

    (d / "rgb").mkdir(parents=True, exist_ok=True)
    (d / "depth").mkdir(parents=True, exist_ok=True)
    for i in range(len(rgb)):
        cv2.imwrite(str(d / "rgb" / f"{i:06d}.png"), np.ascontiguousarray(rgb[i][..., ::-1]))
        np.save(d / "depth" / f"{i:06d}.npy", depth[i].astype(np.float32))
    write_tum(d / "poses.txt", [i / fps for i in range(len(T))], T)


def write_sequence(seq: dict, out_dir: str | Path, fps: float = 30.0) -> Path:
    """Write a rendered sequence in the folder format above."""
    d = Path(out_dir)
    _write_views(d, seq["rgb"], np.where(seq["valid"], seq["depth"], 0), seq["T_wc"], fps)
    if seq["scene"].get("moving"):
        import cv2

        (d / "dynamic").mkdir(exist_ok=True)
        for i, m in enumerate(seq["dynamic"]):
            cv2.imwrite(str(d / "dynamic" / f"{i:06d}.png"), m.astype(np.uint8) * 255)
    if len(seq["virtual"]["rgb"]):
        _write_views(d / "virtual", seq["virtual"]["rgb"], seq["virtual"]["depth"], seq["virtual"]["T_wc"], fps)
    K = seq["K"]
    atomic_write_text(d / "intrinsics.txt", f"{K[0, 0]:.9g} {K[1, 1]:.9g} {K[0, 2]:.9g} {K[1, 2]:.9g}\n")
    meta = {"seed": seq["seed"], "kind": seq["kind"], "frames": len(seq["rgb"]), "size": list(seq["rgb"].shape[1:3]),
            "fps": fps, "hfov_deg": seq["hfov"], "scene": seq["scene"], "format": "streamrecon-synth-1"}
    atomic_write_text(d / "meta.json", json.dumps(meta, indent=1) + "\n")
    return d


def read_sequence(d: str | Path) -> dict:
    """Read a sequence folder: ``rgb``, ``depth``, ``valid``, ``T_wc``, ``K``, ``stamps``, ``meta``, and
    ``dynamic`` ``(N, H, W)`` bool where the folder has motion masks (else ``None``)."""
    from PIL import Image

    from ..mapping import read_tum

    d = Path(d)
    names = sorted(p.stem for p in (d / "rgb").glob("*.png"))
    rgb = np.stack([np.array(Image.open(d / "rgb" / f"{n}.png").convert("RGB")) for n in names])
    depth = np.stack([np.load(d / "depth" / f"{n}.npy") for n in names])
    stamps, T = read_tum(d / "poses.txt")
    fx, fy, cx, cy = (float(v) for v in (d / "intrinsics.txt").read_text().split())
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
    dynamic = None
    if (d / "dynamic").is_dir():
        dynamic = np.stack([np.array(Image.open(d / "dynamic" / f"{n}.png")) > 127 for n in names])
    return {"rgb": rgb, "depth": depth, "valid": depth > 0, "T_wc": T, "K": K, "stamps": stamps, "meta": meta,
            "dynamic": dynamic,
            "rgb_paths": [d / "rgb" / f"{n}.png" for n in names]}


def make_dataset(out_dir: str | Path, n_sequences: int, seed0: int, cfg: SynthConfig = SynthConfig()) -> list[Path]:
    """Render and write ``n_sequences`` sequences ``seq_<seed>`` (seeds ``seed0, seed0+1, ...``)."""
    return [write_sequence(render_sequence(seed0 + i, cfg), Path(out_dir) / f"seq_{seed0 + i:06d}")
            for i in range(n_sequences)]


@dataclass
class SyntheticStream:
    """Endless training batches rendered on the fly (no disk).

    Each sample is a fresh scene and trajectory; ``views`` frames are taken from it with a random
    stride in ``strides`` (only those frames are rendered). With ``pool > 0``, that many sequences are
    rendered once and samples are drawn from them, and every ``refresh_every`` batches one pool entry
    is replaced by a new sequence (cheaper on small CPUs; deterministic by seed).

    Yields dicts: ``img`` ``(B, V, 3, H, W)`` in [-1, 1], ``depth`` ``(B, V, H, W)``, ``valid``
    ``(B, V, H, W)``, ``T_wc`` ``(B, V, 4, 4)`` float32, ``K`` ``(B, V, 3, 3)`` float32.
    """

    batch_size: int = 4
    views: int = 4
    strides: tuple = (1, 2, 3)
    seed: int = 0
    cfg: SynthConfig = field(default_factory=SynthConfig)
    pool: int = 0
    refresh_every: int = 0
    progress: Optional[bool] = None  # a bar while the pool is rendered (None: on a terminal)
    progress_stream: Optional[TextIO] = field(default=None, repr=False)  # where that bar goes (stderr)
    _pool: list = field(default_factory=list, repr=False)

    def _seed(self, k: int) -> int:
        return self.seed * 1_000_003 + k

    def __iter__(self) -> Iterator[dict]:
        g = torch.Generator().manual_seed(self.seed)
        k, batches = 0, 0
        if self.pool and not self._pool:
            from ..progress import bar

            with bar(self.pool * (self.cfg.frames + self.cfg.virtual), f"rendering the training pool ({self.pool} sequences)",
                     enabled=self.progress, stream=self.progress_stream) as b:
                self._pool = [render_sequence(self._seed(i), self.cfg, on_view=lambda: b.update(1))
                              for i in range(self.pool)]
            k = self.pool
        while True:
            if self.pool and self.refresh_every and batches and batches % self.refresh_every == 0:
                self._pool[k % self.pool] = render_sequence(self._seed(k), self.cfg)
                k += 1
            batches += 1
            samples = []
            for _ in range(self.batch_size):
                if self.pool:
                    seq = self._pool[int(torch.randint(self.pool, (1,), generator=g))]
                else:
                    seq = render_sequence(self._seed(k), self.cfg, frames=(self.views - 1) * max(self.strides) + 1)
                    k += 1
                stride = self.strides[int(torch.randint(len(self.strides), (1,), generator=g))]
                n = len(seq["rgb"])
                span = (self.views - 1) * stride
                stride = stride if span < n else max(1, (n - 1) // max(self.views - 1, 1))
                start = int(torch.randint(max(1, n - (self.views - 1) * stride), (1,), generator=g))
                idx = start + stride * np.arange(self.views)
                if float(torch.rand(1, generator=g)) < 0.5:
                    idx = idx[::-1].copy()  # also play sequences backwards
                samples.append({k2: seq[k2][idx] for k2 in ("rgb", "depth", "valid", "T_wc")} | {"K": seq["K"]})
            yield _collate(samples)


def _collate(samples: list[dict]) -> dict[str, Tensor]:
    rgb = torch.from_numpy(np.stack([s["rgb"] for s in samples])).permute(0, 1, 4, 2, 3).float()
    v = rgb.shape[1]
    return {"img": (rgb / 255.0 - 0.5) / 0.5, "depth": torch.from_numpy(np.stack([s["depth"] for s in samples])),
            "valid": torch.from_numpy(np.stack([s["valid"] for s in samples])),
            "T_wc": torch.from_numpy(np.stack([s["T_wc"] for s in samples])).float(),
            "K": torch.from_numpy(np.stack([np.broadcast_to(s["K"], (v, 3, 3)) for s in samples])).float()}
