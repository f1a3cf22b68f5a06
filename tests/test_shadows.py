"""Cast shadows and corner occlusion in the synthetic renderer (``render(shadows=radius)``)."""

from __future__ import annotations

import numpy as np
import torch

from streamrecon.probe import look_at
from streamrecon.synth import intrinsics, render
from streamrecon.synth.render import _hit_cylinder, _hit_sphere
from streamrecon.synth.scene import Primitive, Scene

H, W = 48, 64
K = intrinsics(H, W, 60)


def _room(objects=()) -> Scene:
    """6 x 3 x 6 m, plain grey faces, one light 0.3 m below the ceiling above the centre (y is down)."""
    grey = torch.full((6, 2, 3), 0.6)
    return Scene(room=torch.tensor([6.0, 3.0, 6.0]), room_colors=grey, room_patterns=["checker"] * 6,
                 room_scales=torch.ones(6), objects=list(objects), lights=torch.tensor([[0.0, -2.7, 0.0]]),
                 light_power=torch.tensor([6.0]), ambient=0.3, seed=0)


def _floating_box() -> Primitive:
    """A 0.6 m cube 1.2-1.8 m above the floor, right below the light."""
    return Primitive("box", torch.tensor([0.0, -1.5, 0.0]), torch.tensor([0.3, 0.3, 0.3]), 0.0,
                     torch.full((2, 3), 0.5), "checker", 1.0)


def _down(x: float, z: float, height: float = 1.0) -> torch.Tensor:
    """A camera ``height`` m above the floor point ``(x, 0, z)``, looking straight down."""
    return torch.from_numpy(look_at(np.array([x, -height, z]), np.array([x, 0.0, z]), down=np.array([0.0, 0.0, 1.0])))


def _grey(out) -> torch.Tensor:
    return out["rgb"].float().mean(-1)


def test_a_box_shadows_the_floor_below_it_and_depth_is_unchanged():
    scene, T = _room([_floating_box()]), _down(0.0, 0.0)
    off, on = render(scene, T, K, H, W), render(scene, T, K, H, W, shadows=0.3)
    c_off, c_on = float(_grey(off)[H // 2, W // 2]), float(_grey(on)[H // 2, W // 2])
    assert c_on < 0.5 * c_off  # only the ambient light reaches the floor under the box
    assert torch.equal(on["depth"], off["depth"]) and torch.equal(on["valid"], off["valid"])


def test_the_open_floor_away_from_walls_and_objects_is_unchanged():
    scene, T = _room([_floating_box()]), _down(1.5, 1.5)
    off, on = _grey(render(scene, T, K, H, W)), _grey(render(scene, T, K, H, W, shadows=0.3))
    assert float(off[H // 2, W // 2]) > 60
    assert abs(float(on[H // 2, W // 2]) - float(off[H // 2, W // 2])) <= 2  # 1.5 m from walls: occlusion ~0.4 %


def _row_across_the_shadow_edge(radius: float) -> torch.Tensor:
    """One image row on the floor from the shadow's core (x = 0.2) out to lit floor (x ~ 1.4)."""
    T = _down(0.8, 0.0)  # image rows run along the world x axis
    return _grey(render(_room([_floating_box()]), T, K, H, W, shadows=radius))[H // 2]


def test_a_light_with_area_gives_a_soft_shadow_edge():
    def penumbra(row):  # pixels between a quarter and three quarters of the way from shadow to lit floor
        lo, hi = float(row.min()), float(row.max())
        return int(((row > lo + 0.25 * (hi - lo)) & (row < lo + 0.75 * (hi - lo))).sum())

    hard, soft = _row_across_the_shadow_edge(1e-4), _row_across_the_shadow_edge(0.3)
    assert float(hard.max()) - float(hard.min()) > 40 and float(soft.max()) - float(soft.min()) > 40
    assert penumbra(hard) <= 2  # a hard edge: anti-aliasing only
    assert penumbra(soft) >= 8  # ~0.3 m of floor, 60 degrees across 64 pixels from 1 m up: ~17 pixels


def test_corners_are_darker_and_the_middle_of_a_wall_is_not():
    T = torch.from_numpy(look_at(np.array([0.0, -1.5, 0.0]), np.array([0.0, -1.5, 1.0])))  # the +z wall, 3 m away
    scene = _room()
    off, on = _grey(render(scene, T, K, H, W)), _grey(render(scene, T, K, H, W, shadows=0.3))
    out = render(scene, T, K, H, W)
    assert torch.allclose(out["depth"], torch.full((H, W), 3.0), atol=1e-4)
    mid = (H // 2, W // 2)  # 1.5 m from floor and ceiling, 3 m from the side walls
    assert abs(float(on[mid]) - float(off[mid])) <= 2
    # the bottom row: the wall within ~0.2 m of the floor (60 degree field, 3 m away: 1.7 m above/below centre)
    assert float(on[-1].mean()) < 0.9 * float(off[-1].mean())
    assert float(on[-1].mean()) < float(on[mid]) - 5


def test_hits_from_many_origins_match_one_origin_at_a_time():
    """Shadow rays start at every hit point: spheres and cylinders take ``(N, 3)`` origins."""
    g = torch.Generator().manual_seed(0)
    o = torch.rand(50, 3, generator=g, dtype=torch.float64) * 4 - 2
    c = torch.tensor([0.2, -0.3, 0.1], dtype=torch.float64)
    aim = c + (torch.rand(50, 3, generator=g, dtype=torch.float64) - 0.5) * 2.4  # about half of them hit
    d = torch.nn.functional.normalize(aim - o, dim=-1)
    t_s, n_s = _hit_sphere(o, d, c, 0.8)
    t_c, n_c = _hit_cylinder(o, d, c, 0.6, 0.9)
    assert 5 <= torch.isfinite(t_s).sum() <= 45 and 5 <= torch.isfinite(t_c).sum() <= 45
    for i in range(50):
        ts, ns = _hit_sphere(o[i], d[i:i + 1], c, 0.8)
        tc, nc = _hit_cylinder(o[i], d[i:i + 1], c, 0.6, 0.9)
        assert torch.equal(ts[0], t_s[i]) and torch.equal(tc[0], t_c[i])
        if torch.isfinite(t_s[i]):
            assert torch.allclose(ns[0], n_s[i])
        if torch.isfinite(t_c[i]):
            assert torch.allclose(nc[0], n_c[i])
