"""Pose encodings, transforms, raymaps (against the golden inputs) and focal estimation."""

from __future__ import annotations

import math

import numpy as np
import torch

from streamrecon.geometry import (
    estimate_focal,
    invert_transform,
    matrix_to_pose_encoding,
    pixel_grid,
    pose_encoding_to_matrix,
    principal_point,
    quat_wxyz_to_matrix,
    raymap,
    transform_points,
)


def _random_T(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, 4, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    T = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    T[:, :3, :3] = quat_wxyz_to_matrix(q)
    T[:, :3, 3] = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return T


def test_quaternion_convention_is_real_part_first():
    # 90 degrees about z: (w, x, y, z) = (cos 45, 0, 0, sin 45) maps x to y
    q = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)], dtype=torch.float64)
    R = quat_wxyz_to_matrix(q)
    assert torch.allclose(R @ torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([0.0, 1, 0], dtype=torch.float64))


def test_pose_encoding_round_trip():
    T = _random_T(50)
    enc = matrix_to_pose_encoding(T)
    assert (enc[:, 3] >= 0).all()
    assert torch.allclose(pose_encoding_to_matrix(enc), T, atol=1e-12)


def test_transform_and_inverse():
    T = _random_T(3, seed=1)
    pts = torch.randn(3, 4, 5, 3, dtype=torch.float64)
    back = transform_points(invert_transform(T), transform_points(T, pts))
    assert torch.allclose(back, pts, atol=1e-12)


def test_raymap_matches_golden_inputs(shared):
    for name in ("tiny_dpt", "tiny_linear"):
        z = np.load(shared / "golden" / name / "vectors.npz")
        for key in [k for k in z.files if k.startswith("in.cam_c2w.")]:
            i = key.rsplit(".", 1)[1]
            T = torch.from_numpy(z[key]).double()[None]
            K = torch.from_numpy(z[f"in.cam_K.{i}"]).double()[None]
            ref = z[f"in.ray_map.{i}"]
            ours = raymap(T, K, ref.shape[1], ref.shape[2]).float().numpy()
            assert np.abs(ours - ref).max() <= 1e-6, (name, i)


def test_focal_recovers_a_pinhole_camera():
    h, w, f = 48, 64, 57.0
    pp = principal_point(h, w)
    uv = pixel_grid(h, w, dtype=torch.float64)
    depth = 2.0 + torch.rand(h, w, dtype=torch.float64)
    x = (uv[..., 0] - pp[0, 0]) / f * depth
    y = (uv[..., 1] - pp[0, 1]) / f * depth
    pts = torch.stack([x, y, depth], -1)[None]
    assert abs(estimate_focal(pts, pp.double()).item() - f) < 1e-6
    # robust to a few wild points (Weiszfeld = L1)
    pts_noisy = pts.clone()
    pts_noisy[0, :3, :3, 0] += 50
    assert abs(estimate_focal(pts_noisy, pp.double()).item() - f) < 0.5
