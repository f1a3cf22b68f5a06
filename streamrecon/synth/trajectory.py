"""Camera trajectories inside a synthetic room (camera-to-world poses, OpenCV axes, y down).

Kinds: ``walk`` (smooth path through random waypoints, looking ahead with some wander), ``orbit``
(around a point of interest, looking at it), ``handheld`` (nearly still with jitter), ``rotation``
(pure rotation in place), ``forward`` (straight ahead). Positions stay clear of walls and objects.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..probe import look_at
from .scene import Scene

__all__ = ["KINDS", "make_trajectory", "intrinsics"]

KINDS = ("walk", "orbit", "handheld", "rotation", "forward")


def intrinsics(h: int, w: int, hfov_deg: float) -> Tensor:
    """``(3, 3)`` pinhole with the given horizontal field of view, principal point at the image centre."""
    f = (w / 2) / math.tan(math.radians(hfov_deg) / 2)
    return torch.tensor([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], dtype=torch.float64)


def _yaw_pitch(yaw: float, pitch: float) -> Tensor:
    """Forward direction for a yaw about y (down) and a pitch (positive looks up)."""
    return torch.tensor([math.sin(yaw) * math.cos(pitch), -math.sin(pitch), math.cos(yaw) * math.cos(pitch)],
                        dtype=torch.float64)


def _pose(position: Tensor, forward: Tensor, roll: float = 0.0) -> Tensor:
    T = torch.from_numpy(look_at(position.numpy(), (position + forward).numpy()))
    if roll:  # about the optical axis
        c, s = math.cos(roll), math.sin(roll)
        T[:3, :3] = T[:3, :3] @ torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)
    return T


def _smooth_noise(g: torch.Generator, n: int, scale: float, smooth: int = 5) -> Tensor:
    x = torch.randn(n + 2 * smooth, 3, generator=g, dtype=torch.float64) * scale
    k = torch.ones(2 * smooth + 1, dtype=torch.float64) / (2 * smooth + 1)
    return torch.stack([torch.nn.functional.conv1d(x[:, i][None, None], k[None, None])[0, 0] for i in range(3)], -1)[:n]


def _free_point(scene: Scene, g: torch.Generator, margin: float = 0.6) -> Tensor:
    lo, hi = scene.bounds()
    for _ in range(200):
        r = torch.rand(3, generator=g, dtype=torch.float64)
        p = lo.double() + margin + r * (hi.double() - lo.double() - 2 * margin)
        p[1] = -(1.2 + 0.6 * float(r[1]))  # eye height 1.2 .. 1.8 m
        if scene.free_space_ok(p.float(), margin=0.45):
            return p
    return torch.tensor([0.0, -1.5, 0.0], dtype=torch.float64)


def make_trajectory(scene: Scene, kind: str, n_frames: int, seed: int, step: float = 0.08,
                    pitch: Optional[tuple[float, float]] = None, aim: Optional[Tensor] = None) -> Tensor:
    """``(n_frames, 4, 4)`` float64 camera-to-world poses of the given kind.

    Args:
        pitch: range of the starting pitch (radians, positive looks up); ``None``: ``(-0.18, 0.12)``,
            nearly level.
        aim: ``(3,)`` world point the camera starts looking at (a piece of furniture), its pitch
            kept within ``pitch``; ``None``: a random heading.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown trajectory kind {kind!r}; choose from {KINDS}")
    g = torch.Generator().manual_seed(seed)
    start = _free_point(scene, g)
    yaw0 = float(torch.rand(1, generator=g)) * 2 * math.pi
    r = float(torch.rand(1, generator=g))
    pitch0 = (r - 0.6) * 0.3 if pitch is None else pitch[0] + (pitch[1] - pitch[0]) * r
    pitch = pitch or (-0.18, 0.12)
    if aim is not None:
        to = aim.double() - start
        yaw0 = math.atan2(float(to[0]), float(to[2]))
        level = math.hypot(float(to[0]), float(to[2]))
        pitch0 = min(max(math.atan2(-float(to[1]), max(level, 1e-6)), pitch[0]), pitch[1])
    jitter = _smooth_noise(g, n_frames, 0.02)
    poses = []
    if kind == "walk":
        pos, yaw = start.clone(), yaw0
        wander = _smooth_noise(g, n_frames, 0.08)[:, 0]
        for i in range(n_frames):
            fwd = _yaw_pitch(yaw, pitch0)
            nxt = pos + step * fwd * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
            if not scene.free_space_ok(nxt.float(), margin=0.45):
                yaw += 0.35  # turn away from the obstacle, stay put this frame
                nxt = pos
            poses.append(_pose(pos, fwd, roll=float(jitter[i, 2])))
            pos, yaw = nxt, yaw + float(wander[i])
    elif kind == "orbit":
        lo, hi = (b.double() for b in scene.bounds())
        margin = 0.5
        target = (start + 1.5 * _yaw_pitch(yaw0, 0.0)).clamp(lo + margin + 0.3, hi - margin - 0.3)
        room_room = torch.stack([target - lo, hi - target])[:, [0, 2]].min()  # free distance to the walls in x, z
        radius = max(0.3, min(1.5, float(room_room) - margin))
        ang0, dang = yaw0 + math.pi, (0.5 + float(torch.rand(1, generator=g))) * step / radius
        for i in range(n_frames):
            a = ang0 + i * dang
            pos = target + radius * torch.tensor([math.sin(a), 0.0, math.cos(a)], dtype=torch.float64)
            pos[1] = start[1] + float(jitter[i, 1])
            poses.append(_pose(pos, target - pos))
    elif kind == "handheld":
        for i in range(n_frames):
            fwd = _yaw_pitch(yaw0 + 3 * float(jitter[i, 0]), pitch0 + 3 * float(jitter[i, 1]))
            poses.append(_pose(start + 2 * jitter[i], fwd, roll=float(jitter[i, 2])))
    elif kind == "rotation":
        rate = (0.03 + 0.04 * float(torch.rand(1, generator=g))) * (1 if float(torch.rand(1, generator=g)) < 0.5 else -1)
        for i in range(n_frames):
            poses.append(_pose(start, _yaw_pitch(yaw0 + rate * i, pitch0 + float(jitter[i, 1]))))
    else:  # forward
        fwd = _yaw_pitch(yaw0, pitch0)
        flat = fwd * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
        pos = start.clone()
        for i in range(n_frames):
            nxt = pos + step * flat
            if scene.free_space_ok(nxt.float(), margin=0.45):
                pos = nxt
            poses.append(_pose(pos + jitter[i] * 0.5, fwd))
    return torch.stack(poses)
