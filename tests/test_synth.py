"""Synthetic scenes: known-answer depth, multi-view consistency of poses and depth, determinism, formats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamrecon.probe import look_at
from streamrecon.synth import KINDS, intrinsics, make_trajectory, random_scene, render
from streamrecon.synth.dataset import SynthConfig, SyntheticStream, read_sequence, render_sequence, write_sequence
from streamrecon.synth.scene import Primitive, Scene
from streamrecon.train.losses import unproject


def _empty_room(objects=()) -> Scene:
    return Scene(room=torch.tensor([6.0, 3.0, 6.0]), room_colors=torch.rand(6, 2, 3), room_patterns=["checker"] * 6,
                 room_scales=torch.ones(6) * 2, objects=list(objects), lights=torch.tensor([[0.0, -2.7, 0.0]]),
                 light_power=torch.tensor([6.0]), ambient=0.3, seed=0)


def test_depth_of_a_wall_and_a_sphere():
    T = torch.from_numpy(look_at(np.array([0.0, -1.5, 0.0]), np.array([0.0, -1.5, 1.0])))
    K = intrinsics(48, 64, 60)
    out = render(_empty_room(), T, K, 48, 64)
    assert torch.allclose(out["depth"], torch.full((48, 64), 3.0), atol=1e-4)  # z-depth of the +z wall
    ball = Primitive("sphere", torch.tensor([0.0, -1.5, 2.0]), torch.tensor([0.5, 0.5, 0.5]), 0.0, torch.rand(2, 3),
                     "noise", 3.0)
    out = render(_empty_room([ball]), T, K, 48, 64)
    v, u = 24, 32  # near the principal point (31.5, 23.5)
    assert abs(float(out["depth"][v, u]) - 1.5) < 0.01
    assert out["valid"].all() and out["rgb"].dtype == torch.uint8


def test_views_agree_through_their_poses():
    """Points seen in frame 0 project into frame 3 at pixels whose depth matches (static scene)."""
    scene = random_scene(3)
    T = make_trajectory(scene, "walk", 4, seed=1)
    K = intrinsics(56, 80, 65)
    a, b = render(scene, T[0], K, 56, 80), render(scene, T[3], K, 56, 80)
    pts_w = unproject(a["depth"].double(), K) @ T[0][:3, :3].T + T[0][:3, 3]
    Tinv = torch.linalg.inv(T[3])
    cam = pts_w @ Tinv[:3, :3].T + Tinv[:3, 3]
    uv = cam @ K.T
    u, v = uv[..., 0] / uv[..., 2], uv[..., 1] / uv[..., 2]
    ui, vi = u.round().long(), v.round().long()
    inside = (cam[..., 2] > 0.1) & (ui >= 0) & (ui < 80) & (vi >= 0) & (vi < 56) & ((u - ui).abs() < 0.25) & \
        ((v - vi).abs() < 0.25)
    assert inside.sum() > 200
    d_b = b["depth"].double()[vi[inside], ui[inside]]
    agree = ((d_b - cam[..., 2][inside]).abs() < 0.05 * d_b).float().mean()
    assert agree > 0.85, float(agree)  # the rest: occlusion boundaries


@pytest.mark.parametrize("kind", KINDS)
def test_trajectories_are_valid_and_behave(kind):
    scene = random_scene(5)
    T = make_trajectory(scene, kind, 30, seed=2)
    R = T[:, :3, :3]
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=T.dtype).expand(30, 3, 3), atol=1e-9)
    assert torch.allclose(torch.linalg.det(R), torch.ones(30, dtype=T.dtype))
    lo, hi = scene.bounds()
    assert ((T[:, :3, 3] > lo.double()) & (T[:, :3, 3] < hi.double())).all()
    moved = float((T[1:, :3, 3] - T[:-1, :3, 3]).norm(dim=1).sum())
    if kind == "rotation":
        assert moved == 0 and float(torch.arccos(((R[0].T @ R[-1]).trace() - 1) / 2)) > 0.5
    elif kind == "handheld":
        assert moved < 0.6
    else:
        assert moved > 0.5


def test_rendering_is_deterministic_and_moving_objects_move(tmp_path):
    cfg = SynthConfig(height=32, width=48, frames=5, virtual=2, moving=2)
    a, b = render_sequence(11, cfg), render_sequence(11, cfg)
    assert np.array_equal(a["rgb"], b["rgb"]) and np.array_equal(a["depth"], b["depth"]) and a["kind"] == b["kind"]
    assert not np.array_equal(a["rgb"], render_sequence(12, cfg)["rgb"])
    scene = random_scene(11, moving=2)
    assert float(scene.objects[0].velocity.norm()) > 0 and float(scene.objects[-1].velocity.norm()) == 0
    d = write_sequence(a, tmp_path / "seq")
    back = read_sequence(d)
    assert np.array_equal(back["rgb"], a["rgb"]) and np.allclose(back["depth"], a["depth"])
    assert np.allclose(back["T_wc"], a["T_wc"], atol=1e-6) and np.allclose(back["K"], a["K"], atol=1e-6)
    assert (d / "virtual" / "poses.txt").exists() and len(list((d / "virtual" / "rgb").iterdir())) == 2
    assert back["meta"]["kind"] == a["kind"] and back["meta"]["format"] == "streamrecon-synth-1"


def test_training_stream_batches():
    stream = iter(SyntheticStream(batch_size=2, views=3, cfg=SynthConfig(height=32, width=48, frames=8), pool=2,
                                  refresh_every=1))
    b1, b2 = next(stream), next(stream)
    assert b1["img"].shape == (2, 3, 3, 32, 48) and b1["img"].min() >= -1 and b1["img"].max() <= 1
    assert b1["depth"].shape == (2, 3, 32, 48) and b1["valid"].dtype == torch.bool
    assert b1["T_wc"].shape == (2, 3, 4, 4) and b1["K"].shape == (2, 3, 3, 3)
    assert not torch.equal(b1["img"], b2["img"])
    fresh = iter(SyntheticStream(batch_size=1, views=2, cfg=SynthConfig(height=32, width=48)))
    assert next(fresh)["img"].shape == (1, 2, 3, 32, 48)
    assert math.isfinite(float(b1["depth"][b1["valid"]].mean()))
