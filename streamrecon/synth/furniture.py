"""Furniture for procedural rooms: desks, chairs, cubicle partitions, open shelves with books, and
cabinets, each built from thin boxes and cylinders (the primitives :mod:`.render` casts).

The point is the layout real indoor video shows and plain boxes do not: thin legs and boards with
free space behind them, horizontal work surfaces at desk height, open cavities (shelf bins) seen
from the front, and pieces standing against walls. Frames as in :mod:`.scene`: metres, y down,
the floor at ``y = 0``; a piece is built in its own frame (origin on the floor at its footprint's
centre, local ``+z`` away from the wall it stands against) and placed with a yaw about ``y``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .scene import rot_y

__all__ = ["Piece", "KINDS", "build_piece", "place_furniture"]

KINDS = ("desk", "chair", "partition", "cubicle", "shelf", "cabinet")
_WALL_KINDS = ("desk", "partition", "cubicle", "shelf", "cabinet")


@dataclass(frozen=True)
class Piece:
    """One piece of furniture in the world.

    Attributes:
        kind: one of :data:`KINDS`.
        origin: ``(3,)`` world position of the piece's floor origin.
        yaw: rotation about the vertical axis (the renderer's convention: world = origin + R_y(yaw) @ local).
        radius: footprint radius (metres, for spacing pieces).
        parts: ``(kind, local centre (3,), size (3,))`` per primitive, in the piece's frame (``size`` as
            :class:`~streamrecon.synth.scene.Primitive`: box half-extents, cylinder ``(r, half_h, r)``).
        focus: ``(3,)`` world point a camera would look at (a desk top, a shelf's middle).
    """

    kind: str
    origin: Tensor
    yaw: float
    radius: float
    parts: tuple
    focus: Tensor


def _box(x: float, y_top: float, z: float, hx: float, hy: float, hz: float) -> tuple:
    """A box whose *top* is ``y_top`` metres above the floor (local frame, y down)."""
    return ("box", torch.tensor([x, -(y_top - hy), z]), torch.tensor([hx, hy, hz]))


def _cyl(x: float, y_top: float, z: float, r: float, hh: float) -> tuple:
    return ("cylinder", torch.tensor([x, -(y_top - hh), z]), torch.tensor([r, hh, r]))


def build_piece(kind: str, u: Callable[[float, float], float]) -> tuple[list, float, Tensor, float]:
    """The parts of one piece in its own frame.

    Args:
        kind: one of :data:`KINDS`.
        u: ``u(a, b)``, a uniform draw in ``[a, b]`` (the scene's generator).

    Returns:
        ``(parts, half_depth, focus_local (3,), half_width)``: the parts (see :class:`Piece`), how far
        the piece reaches from its origin along local ``z`` (to stand it against a wall), the local
        point a camera would look at, and its half width along local ``x``.
    """
    parts: list = []
    if kind in ("desk", "cubicle"):
        hw, hd, top = u(0.5, 0.8), u(0.28, 0.4), u(0.7, 0.76)
        leg = u(0.018, 0.03)
        parts.append(_box(0, top, 0, hw, 0.018, hd))
        for sx in (-1, 1):
            for sz in (-1, 1):
                parts.append(_box(sx * (hw - 0.05), top - 0.036, sz * (hd - 0.05), leg, (top - 0.036) / 2, leg))
        if u(0, 1) < 0.6:  # a monitor or a box on the desk, a mug
            mw = u(0.18, 0.3)
            parts.append(_box(u(-hw + 0.3, hw - 0.3), top + 2 * u(0.15, 0.22), -hd + 0.15, mw, u(0.15, 0.22), 0.02))
        if u(0, 1) < 0.5:
            parts.append(_cyl(u(-hw + 0.1, hw - 0.1), top + 0.1, u(-hd + 0.1, hd - 0.1), u(0.03, 0.05), 0.05))
        focus = torch.tensor([0.0, -top, 0.0])
        if kind == "cubicle":  # partitions behind and beside the desk
            ph, t = u(1.2, 1.6), u(0.02, 0.035)
            parts.append(_box(0, ph, -hd - t, hw + 2 * t, ph / 2, t))
            for sx in (-1, 1):
                parts.append(_box(sx * (hw + t), ph, 0.1, t, ph / 2, hd + 0.1))
            return parts, hd + 2 * t, focus, hw + 2 * t
        return parts, hd, focus, hw
    if kind == "chair":
        seat, hs = u(0.42, 0.5), u(0.2, 0.26)
        parts.append(_box(0, seat, 0, hs, 0.035, hs))
        back = u(0.3, 0.45)
        parts.append(_box(0, seat + back, -hs + 0.02, hs * 0.9, back / 2, 0.025))
        parts.append(_cyl(0, seat - 0.07, 0, u(0.02, 0.035), (seat - 0.12) / 2))
        parts.append(_cyl(0, 0.05, 0, u(0.25, 0.32), 0.02))
        return parts, hs, torch.tensor([0.0, -seat, 0.0]), hs
    if kind == "partition":
        hw, hh, t = u(0.5, 1.1), u(0.55, 0.85), u(0.02, 0.035)
        parts.append(_box(0, 2 * hh, 0, hw, hh, t))
        return parts, t, torch.tensor([0.0, -hh, 0.0]), hw
    if kind == "shelf":  # an open bookcase: back, sides, top, bottom and boards; books in some bins
        hw, hh, hd, t = u(0.35, 0.8), u(0.45, 1.0), u(0.15, 0.25), u(0.012, 0.025)
        parts.append(_box(0, 2 * hh, -hd + t, hw, hh, t))  # back
        for sx in (-1, 1):
            parts.append(_box(sx * (hw - t), 2 * hh, 0, t, hh, hd))
        n_boards = int(u(1, 4.999))
        levels = [2 * hh * k / (n_boards + 1) for k in range(n_boards + 2)]  # bottom .. top
        for y in levels:
            parts.append(_box(0, max(y, 2 * t), 0, hw, t, hd))
        for lo, hi in zip(levels[:-1], levels[1:]):  # books standing in the bin
            x = -hw + 2 * t
            while x < hw - 0.1 and u(0, 1) < 0.85:
                bw, bh = u(0.01, 0.035), min(u(0.6, 0.95) * (hi - lo - 2 * t), 0.4)
                if u(0, 1) < 0.3:
                    x += u(0.05, 0.3)  # a gap
                    continue
                parts.append(_box(x + bw, max(lo, 2 * t) + bh, u(-0.02, 0.02), bw, bh / 2, hd * u(0.6, 0.9)))
                x += 2 * bw + 0.004
        return parts, hd, torch.tensor([0.0, -hh, 0.0]), hw
    if kind == "cabinet":
        hw, hh, hd = u(0.25, 0.6), u(0.3, 0.6), u(0.2, 0.35)
        parts.append(_box(0, 2 * hh, 0, hw, hh, hd))
        if u(0, 1) < 0.5:
            parts.append(_box(u(-hw + 0.1, hw - 0.1), 2 * hh + 0.2, 0, u(0.05, 0.12), 0.1, u(0.05, 0.12)))
        return parts, hd, torch.tensor([0.0, -2 * hh, 0.0]), hw
    raise ValueError(f"unknown furniture kind {kind!r}; choose from {KINDS}")


def place_furniture(room: Tensor, n: int, u: Callable[[float, float], float],
                    choice: Callable[[tuple], str]) -> list[Piece]:
    """Up to ``n`` pieces in a room ``(3,)`` (width, height, depth), most against a wall, none
    overlapping another's footprint; a piece that finds no room after some tries is dropped."""
    w, _, d = room.tolist()
    pieces: list[Piece] = []
    for _ in range(n):
        kind = choice(KINDS)
        parts, half_depth, focus, half_width = build_piece(kind, u)
        radius = math.hypot(half_width, half_depth)
        for _try in range(12):
            if kind in _WALL_KINDS and u(0, 1) < 0.8:
                wall = int(u(0, 3.999))  # -z, +z, -x, +x
                yaw = (0.0, math.pi, math.pi / 2, -math.pi / 2)[wall]
                along = (w if wall < 2 else d) / 2 - half_width - 0.05
                if along <= 0:
                    continue
                s, off = u(-along, along), half_depth + 0.02
                origin = {0: (s, -d / 2 + off), 1: (s, d / 2 - off), 2: (-w / 2 + off, s), 3: (w / 2 - off, s)}[wall]
            else:
                yaw = u(0, 2 * math.pi)
                if w / 2 - radius - 0.3 <= 0 or d / 2 - radius - 0.3 <= 0:
                    continue
                origin = (u(-w / 2 + radius + 0.3, w / 2 - radius - 0.3), u(-d / 2 + radius + 0.3, d / 2 - radius - 0.3))
            o = torch.tensor([origin[0], 0.0, origin[1]])
            if all(float((o - p.origin).norm()) > radius + p.radius for p in pieces):
                R = rot_y(yaw)
                pieces.append(Piece(kind, o, yaw, radius, tuple(parts), o + R @ focus))
                break
    return pieces
