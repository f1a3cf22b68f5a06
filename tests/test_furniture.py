"""Furnished synthetic rooms: pieces stand on the floor inside the room without overlapping, their
boards render at the right depth, free space is the exact distance to thin boards, the camera can
start looking at a piece, and unfurnished scenes are what they were."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamrecon.probe import look_at
from streamrecon.synth import intrinsics, make_trajectory, random_scene, render
from streamrecon.synth.dataset import SynthConfig, render_sequence
from streamrecon.synth.furniture import KINDS, build_piece, place_furniture
from streamrecon.synth.scene import Primitive, Scene


def _draws(seed: int):
    g = torch.Generator().manual_seed(seed)

    def u(a, b):
        return a + (b - a) * torch.rand(1, generator=g).item()

    def choice(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    return u, choice


def _room(objects) -> Scene:
    return Scene(room=torch.tensor([6.0, 3.0, 6.0]), room_colors=torch.rand(6, 2, 3), room_patterns=["checker"] * 6,
                 room_scales=torch.ones(6) * 2, objects=list(objects), lights=torch.tensor([[0.0, -2.7, 0.0]]),
                 light_power=torch.tensor([6.0]), ambient=0.3, seed=0)


@pytest.mark.parametrize("seed", range(5))
def test_pieces_stand_in_the_room_apart(seed):
    u, choice = _draws(seed)
    room = torch.tensor([5.0, 2.8, 6.0])
    pieces = place_furniture(room, 8, u, choice)
    assert pieces and {p.kind for p in pieces} <= set(KINDS)
    for i, p in enumerate(pieces):
        for q in pieces[i + 1:]:
            assert float((p.origin - q.origin).norm()) > p.radius + q.radius
        c, s = math.cos(p.yaw), math.sin(p.yaw)
        R = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
        for _kind, centre, size in p.parts:
            w = p.origin + R @ centre
            reach = float(size[[0, 2]].norm())  # a box's half diagonal in the floor plane
            assert abs(float(w[0])) < 2.5 + 0.01 and abs(float(w[2])) < 3.0 + 0.01, (p.kind, w)
            assert abs(float(w[0])) - reach < 2.5 and abs(float(w[2])) - reach < 3.0
            assert float(w[1] + size[1]) <= 1e-5  # nothing below the floor (y down)
            assert float(w[1] - size[1]) > -2.8  # nor through the ceiling


def test_desk_top_renders_at_its_height():
    u, _ = _draws(3)
    parts, _, focus, _ = build_piece("desk", u)
    top = -float(focus[1])
    assert 0.7 <= top <= 0.76
    prims = [Primitive(k, c, s, 0.0, torch.rand(2, 3), "noise", 3.0, group=0) for k, c, s in parts[:5]]  # top + legs
    T = torch.from_numpy(look_at(np.array([0.0, -1.7, 0.0]), np.array([0.0, 0.0, 0.0]), down=np.array([0.0, 0.0, 1.0])))
    K = intrinsics(32, 32, 25)
    out = render(_room(prims), T, K, 32, 32)
    assert abs(float(out["depth"][16, 16]) - (1.7 - top)) < 1e-3  # looking straight down at the top
    assert float(out["depth"].max()) < 1.7 - top + 0.05  # the 25-degree view stays on the top


def test_free_space_is_the_distance_to_a_thin_board():
    board = Primitive("box", torch.tensor([0.0, -0.8, 0.0]), torch.tensor([1.0, 0.8, 0.02]), 0.0, torch.rand(2, 3),
                      "noise", 3.0, group=0)
    scene = _room([board])
    assert not scene.free_space_ok(torch.tensor([0.5, -1.2, 0.1]), margin=0.3)  # 8 cm in front of it
    assert scene.free_space_ok(torch.tensor([0.5, -1.2, 0.6]), margin=0.3)  # 58 cm: free
    loose = Primitive("box", board.center, board.size, 0.0, board.color, "noise", 3.0)  # not furniture
    assert not _room([loose]).free_space_ok(torch.tensor([0.5, -1.2, 0.6]), margin=0.3)  # the old, coarse reach


def test_unfurnished_scene_is_unchanged_and_furniture_adds_groups():
    a, b = random_scene(17), random_scene(17, furniture=(4, 4))
    assert torch.equal(a.room, b.room) and torch.equal(a.lights, b.lights)
    assert all(o.group == -1 for o in a.objects) and not a.furniture
    groups = {o.group for o in b.objects if o.group >= 0}
    assert len(b.furniture) >= 1 and groups == set(range(len(b.furniture)))
    free = [o for o in b.objects if o.group < 0]
    assert len(free) <= len(a.objects)  # free objects a piece stands on are removed
    c = random_scene(17)
    assert [o.center.tolist() for o in c.objects] == [o.center.tolist() for o in a.objects]


def test_camera_starts_looking_at_the_aim():
    scene = random_scene(21, furniture=(3, 3))
    target = scene.furniture[0].focus
    T = make_trajectory(scene, "handheld", 3, seed=4, pitch=(-1.2, 0.5), aim=target)
    fwd, pos = T[0, :3, 2], T[0, :3, 3]
    to = (target.double() - pos)
    cos = float(fwd @ to / to.norm())
    assert cos > 0.97, cos  # within the handheld jitter
    level = make_trajectory(scene, "handheld", 3, seed=4, pitch=(0.0, 0.0), aim=target)
    assert abs(float(level[0, 1, 2])) < 0.1  # the pitch is clamped to its range: nearly level


def test_a_furnished_sequence_renders_and_aims():
    cfg = SynthConfig(height=24, width=32, frames=3, virtual=0, furniture=(3, 6), pitch=(-0.55, 0.1), aim_prob=1.0)
    seq = render_sequence(5, cfg)
    assert seq["depth"].shape == (3, 24, 32) and seq["valid"].mean() > 0.95
    again = render_sequence(5, cfg)
    assert np.array_equal(seq["rgb"], again["rgb"])  # deterministic by seed
    plain = render_sequence(5, SynthConfig(height=24, width=32, frames=3, virtual=0))
    assert not np.array_equal(seq["depth"], plain["depth"])


def test_unknown_piece_is_refused():
    u, _ = _draws(0)
    with pytest.raises(ValueError, match="unknown furniture kind 'sofa'"):
        build_piece("sofa", u)
