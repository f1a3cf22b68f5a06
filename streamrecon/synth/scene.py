"""Procedural indoor scenes: a room (floor, walls, ceiling) with boxes, spheres, cylinders and
panels, each with a procedural texture, lit by point lights. Deterministic by seed.

World frame of the generator: metres, y points *down* (as OpenCV cameras), the floor at
``y = 0`` and the ceiling at ``y = -height``. Objects can move linearly (``velocity`` per frame).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Scene", "Primitive", "random_scene", "rot_y", "PATTERNS"]

PATTERNS = ("checker", "stripes", "noise", "marble", "grid")


@dataclass
class Primitive:
    """One object.

    Attributes:
        kind: ``box`` (oriented about the vertical axis), ``sphere``, ``cylinder`` (vertical, capped).
        center: ``(3,)`` centre at frame 0.
        size: box half-extents ``(3,)``; sphere ``(r, r, r)``; cylinder ``(r, half_height, r)``.
        yaw: rotation about the vertical axis (boxes).
        color: ``(2, 3)`` two RGB colours in ``[0, 1]`` the pattern blends.
        pattern: one of :data:`PATTERNS`; ``scale``: pattern frequency (1/m).
        velocity: ``(3,)`` metres per frame (moving objects), zero for static ones.
        texture: index into the scene's ``textures`` (a photograph instead of ``pattern``), -1: none;
        tex_scale: its repeats per metre.
        group: the furniture piece (:mod:`.furniture`) it is a part of, -1 for a free object.
    """

    kind: str
    center: Tensor
    size: Tensor
    yaw: float
    color: Tensor
    pattern: str
    scale: float
    velocity: Tensor = field(default_factory=lambda: torch.zeros(3))
    texture: int = -1
    tex_scale: float = 1.0
    group: int = -1  # index of the furniture piece it belongs to (scene.furniture), -1: none


@dataclass
class Scene:
    """A room ``[-w/2, w/2] x [-h, 0] x [-d/2, d/2]`` (x, y down, z) with objects and lights."""

    room: Tensor  # (3,) width, height, depth
    room_colors: Tensor  # (6, 2, 3): faces -x, +x, ceiling (-y), floor (+y), -z, +z
    room_patterns: list[str]
    room_scales: Tensor  # (6,)
    objects: list[Primitive]
    lights: Tensor  # (L, 3) positions
    light_power: Tensor  # (L,)
    ambient: float
    seed: int
    textures: tuple = ()  # (3, H, W) photographs in [0, 1] (streamrecon.synth.textures)
    room_textures: list = field(default_factory=lambda: [-1] * 6)  # per face: index into textures, -1: pattern
    room_tex_scales: list = field(default_factory=lambda: [1.0] * 6)
    furniture: list = field(default_factory=list)  # streamrecon.synth.furniture.Piece, parts in objects

    def bounds(self) -> tuple[Tensor, Tensor]:
        w, h, d = self.room.tolist()
        return torch.tensor([-w / 2, -h, -d / 2]), torch.tensor([w / 2, 0.0, d / 2])

    def free_space_ok(self, p: Tensor, margin: float = 0.35, frame: int = 0) -> bool:
        """Whether a camera at ``p`` keeps ``margin`` from walls and objects."""
        lo, hi = self.bounds()
        if ((p - lo) < margin).any() or ((hi - p) < margin).any():
            return False
        for o in self.objects:
            c = o.center + frame * o.velocity
            if o.group >= 0 and o.kind == "box":  # furniture boards: the exact distance to the box
                local = (p - c) @ rot_y(o.yaw)
                if float((local.abs() - o.size).clamp(min=0).norm()) < margin:
                    return False
                continue
            reach = float(o.size.max()) * (1.8 if o.kind == "box" else 1.0) + margin
            if float((p - c).norm()) < reach:
                return False
        return True


def rot_y(yaw: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(3, 3)`` rotation about the vertical axis: a primitive's local point ``x`` is at ``center + R @ x``."""
    c, s = math.cos(yaw), math.sin(yaw)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=dtype)


def _palette(g: torch.Generator) -> Tensor:
    """Two related colours: a random hue, light and dark variants."""
    hue = torch.rand(1, generator=g).item()
    sat = 0.2 + 0.6 * torch.rand(1, generator=g).item()
    base = torch.tensor([math.cos(2 * math.pi * (hue + k / 3)) * 0.5 + 0.5 for k in range(3)])
    base = (1 - sat) + sat * base
    lo = 0.15 + 0.35 * torch.rand(1, generator=g).item()
    hi = min(1.0, lo + 0.3 + 0.4 * torch.rand(1, generator=g).item())
    return torch.stack([base * lo, base * hi]).clamp(0, 1)


def random_scene(seed: int, n_objects: tuple[int, int] = (4, 10), moving: int = 0,
                 speed: tuple[float, float] = (0.01, 0.03), textures: tuple = (), texture_prob: float = 0.5,
                 furniture: tuple[int, int] = (0, 0)) -> Scene:
    """A random room with objects on the floor (and a few floating), ``moving`` of them in motion
    (horizontally, ``speed`` metres per frame). With ``textures`` (photographs, see
    :mod:`streamrecon.synth.textures`) each surface carries one of them with probability
    ``texture_prob`` instead of its pattern; those draws use their own generator, so the geometry,
    patterns and lights of a seed are the same with or without textures. ``furniture`` (a count range)
    adds desks, chairs, partitions, shelves and cabinets (:mod:`.furniture`) after the objects, with
    their own generator too: with ``(0, 0)`` a seed's scene is what it was before furniture existed."""
    g = torch.Generator().manual_seed(seed)

    def u(a: float, b: float) -> float:
        return a + (b - a) * torch.rand(1, generator=g).item()

    def choice(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    room = torch.tensor([u(4.0, 8.0), u(2.5, 3.2), u(4.0, 8.0)])
    w, h, d = room.tolist()
    room_colors = torch.stack([_palette(g) for _ in range(6)])
    room_patterns = [choice(PATTERNS) for _ in range(6)]
    room_scales = torch.tensor([u(1.0, 4.0) for _ in range(6)])
    objects = []
    n = int(torch.randint(n_objects[0], n_objects[1] + 1, (1,), generator=g))
    for i in range(n):
        kind = choice(("box", "box", "sphere", "cylinder"))
        if kind == "box":
            size = torch.tensor([u(0.15, 0.7), u(0.15, 0.8), u(0.15, 0.7)])
            y = -size[1].item()
        elif kind == "sphere":
            r = u(0.15, 0.5)
            size = torch.tensor([r, r, r])
            y = -r if torch.rand(1, generator=g).item() < 0.7 else -u(r + 0.3, h - r - 0.2)
        else:
            r, hh = u(0.1, 0.35), u(0.2, 0.9)
            size = torch.tensor([r, hh, r])
            y = -hh
        center = torch.tensor([u(-w / 2 + 0.6, w / 2 - 0.6), y, u(-d / 2 + 0.6, d / 2 - 0.6)])
        vel = torch.zeros(3)
        if i < moving:
            ang = u(0, 2 * math.pi)
            vel = torch.tensor([math.cos(ang), 0.0, math.sin(ang)]) * u(*speed)
        objects.append(Primitive(kind, center, size, u(0, math.pi), _palette(g), choice(PATTERNS), u(2.0, 10.0), vel))
    n_lights = int(torch.randint(1, 3, (1,), generator=g))
    lights = torch.tensor([[u(-w / 3, w / 3), -h + 0.3, u(-d / 3, d / 3)] for _ in range(n_lights)])
    power = torch.tensor([u(4.0, 10.0) for _ in range(n_lights)])
    scene = Scene(room, room_colors, room_patterns, room_scales, objects, lights, power, u(0.25, 0.45), seed)
    if furniture[1] > 0:
        _add_furniture(scene, seed, furniture)
    if textures:
        gt = torch.Generator().manual_seed(seed * 7 + 123457)

        def draw() -> tuple[int, float]:
            if torch.rand(1, generator=gt).item() >= texture_prob:
                return -1, 1.0
            k = int(torch.randint(len(textures), (1,), generator=gt))
            return k, 0.25 + 1.25 * torch.rand(1, generator=gt).item()  # 0.8-4 m per repeat

        scene.textures = tuple(textures)
        faces = [draw() for _ in range(6)]
        scene.room_textures, scene.room_tex_scales = [f[0] for f in faces], [f[1] for f in faces]
        pieces: dict = {}
        for prim in objects:
            if prim.group >= 0:  # one texture per piece of furniture
                if prim.group not in pieces:
                    pieces[prim.group] = draw()
                prim.texture, prim.tex_scale = pieces[prim.group][0], pieces[prim.group][1] * 2.0
                continue
            prim.texture, prim.tex_scale = draw()
            prim.tex_scale *= 2.0  # objects are smaller than walls
    return scene


def _add_furniture(scene: Scene, seed: int, count: tuple[int, int]) -> None:
    """Place furniture (its own generator) and append its parts to ``scene.objects``; free objects
    a piece overlaps are removed."""
    from .furniture import place_furniture

    g = torch.Generator().manual_seed(seed * 31 + 9176)

    def u(a: float, b: float) -> float:
        return a + (b - a) * torch.rand(1, generator=g).item()

    def choice(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    n = int(torch.randint(count[0], count[1] + 1, (1,), generator=g))
    pieces = place_furniture(scene.room, n, u, choice)
    kept = [o for o in scene.objects
            if all(float(((o.center - p.origin) * torch.tensor([1.0, 0.0, 1.0])).norm()) > p.radius + float(o.size.max())
                   for p in pieces)]
    scene.objects[:] = kept
    for k, piece in enumerate(pieces):
        colors, pattern, scale = _palette(g), choice(("noise", "marble", "stripes", "grid", "checker")), u(2.0, 12.0)
        R = rot_y(piece.yaw)
        for kind, centre, size in piece.parts:
            scene.objects.append(Primitive(kind, piece.origin + R @ centre, size, piece.yaw, colors, pattern, scale,
                                           group=k))
    scene.furniture = pieces
