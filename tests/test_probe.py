"""Probe specs and virtual camera placement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamrecon.probe import look_at, orbit_cameras, parse_probe


def test_probe_grammar(tmp_path):
    p = parse_probe("orbit")
    assert p.kind == "orbit" and p.count == 8 and p.at_end and not p.due(5)
    p = parse_probe("orbit:3@every:10")
    assert p.count == 3 and not p.at_end and p.due(9) and p.due(19) and not p.due(10)
    p = parse_probe("orbit@5,7")
    assert p.due(5) and p.due(7) and not p.due(6)
    cams = tmp_path / "c.json"
    cams.write_text(json.dumps({"cameras": [{"name": "a", "T_wc": np.eye(4).tolist()}]}))
    p = parse_probe(f"{cams}@end")
    assert p.kind == "file" and p.cameras(np.zeros((0, 3)), np.eye(4))[0].name == "a"
    for bad, msg in (("orbit:x", "integer"), ("orbit:0", "at least one"), ("sphere", "expected"),
                     (str(tmp_path / "none.json"), "not found"), ("orbit@every:q", "integer"), ("orbit@a,b", "WHEN")):
        with pytest.raises(ValueError, match=msg):
            parse_probe(bad)
    cams.write_text(json.dumps([{"T_wc": [[1, 0], [0, 1]]}]))
    with pytest.raises(ValueError, match="4x4"):
        parse_probe(str(cams))


def test_look_at_and_orbit_geometry():
    T = look_at(np.array([0.0, 0, -2]), np.zeros(3))
    R = T[:3, :3]
    assert np.allclose(R.T @ R, np.eye(3)) and np.isclose(np.linalg.det(R), 1)
    assert np.allclose(R[:, 2], [0, 0, 1]) and np.allclose(R[:, 0], [1, 0, 0])  # OpenCV: z forward, x right
    pts = np.random.default_rng(0).normal(size=(500, 3)) + np.array([0.0, 0, 3])
    latest = look_at(np.array([0.0, -0.5, 0]), np.array([0.0, 0, 3]))
    cams = orbit_cameras(pts, latest, 6)
    centre = np.median(pts, 0)
    assert len(cams) == 6 and np.allclose(cams[0].T_wc[:3, 3], latest[:3, 3], atol=1e-9)  # starts at the camera
    for c in cams:
        to_centre = centre - c.T_wc[:3, 3]
        assert np.allclose(c.T_wc[:3, 2], to_centre / np.linalg.norm(to_centre))  # looks at the centre
        assert np.isclose(c.T_wc[1, 3], -0.5)  # same height as the latest camera
        assert np.isclose(np.hypot(*(c.T_wc[[0, 2], 3] - centre[[0, 2]])), np.hypot(*(latest[[0, 2], 3] - centre[[0, 2]])))


def test_the_map_is_rendered_from_the_probe_camera_nearest_point_first():
    from streamrecon.mapping.render import depth_disagreement, render_map

    K = np.array([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    g = np.stack(np.meshgrid(np.linspace(-0.5, 0.5, 60), np.linspace(-0.4, 0.4, 50)), -1).reshape(-1, 2)
    far = np.c_[g, np.full(len(g), 2.0)]  # a red wall 2 m ahead
    near = np.c_[g[::7] * 0.2, np.full(len(g[::7]), 1.0)]  # a small green patch 1 m ahead, in front of it
    xyz = np.r_[far, near]
    rgb = np.r_[np.tile([255, 0, 0], (len(far), 1)), np.tile([0, 255, 0], (len(near), 1))].astype(np.uint8)
    view = render_map(xyz, rgb, np.eye(4), K, (48, 64), voxel_size=0.02)
    assert view.mask[24, 32] and np.isclose(view.depth[24, 32], 1.0) and tuple(view.rgb[24, 32]) == (0, 255, 0)
    assert np.isclose(view.depth[16, 22], 2.0, atol=1e-3) and tuple(view.rgb[16, 22]) == (255, 0, 0)
    assert 0.1 < view.coverage < 0.5 and not view.mask[0, 0]  # the wall's footprint (~25 x 20 px), not the corners
    behind = render_map(xyz, rgb, np.diag([1.0, 1, -1, 1]) @ np.diag([-1.0, 1, 1, 1]), K, (48, 64))
    assert behind.coverage == 0.0  # turned around: nothing of the map is in front of the camera
    pred = np.full((48, 64), 2.2, np.float32)
    d = depth_disagreement(pred, view)
    assert np.isclose(d[16, 22], 0.1, atol=1e-3) and np.isnan(d[0, 0])
