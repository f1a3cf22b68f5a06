"""Global map (voxel averaging, confidence filter, budget) and the exports (read back independently)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from streamrecon.mapping import GlobalMap, MapConfig, read_ply, read_tum, write_glb, write_ply, write_tum


def _cfg(**kw):
    base = dict(voxel_size=1.0, conf_thresh=1.5, pixel_stride=1)
    base.update(kw)
    return MapConfig(**base)


def test_voxel_averaging_and_filters():
    g = GlobalMap(_cfg())
    pts = np.array([[0.1, 0.1, 0.1], [0.3, 0.5, 0.9], [5.2, 0, 0], [5.4, 0, 0], [np.nan, 0, 0], [9, 9, 9]], np.float32)
    col = np.array([[0, 0, 0], [100, 200, 50], [10, 10, 10], [20, 20, 20], [0, 0, 0], [0, 0, 0]], np.uint8)
    conf = np.array([2, 2, 2, 2, 2, 1.2], np.float32)  # the last one is below the threshold
    res = g.integrate(pts, col, conf, frame_index=0)
    assert res.points_in == 6 and res.points_kept == 4 and len(g) == 2
    xyz, rgb, c = g.points()
    order = np.argsort(xyz[:, 0])
    assert np.allclose(xyz[order], [[0.2, 0.3, 0.5], [5.3, 0, 0]], atol=1e-6)
    assert rgb[order].tolist() == [[50, 100, 25], [15, 15, 15]]
    # a second frame into an existing voxel updates the average and creates nothing new
    res = g.integrate(np.array([[0.5, 0.5, 0.5]], np.float32), np.array([[200, 200, 200]], np.uint8),
                      np.array([3.0], np.float32), frame_index=1)
    assert len(res.new_points) == 0 and len(g) == 2
    xyz, rgb, c = g.points()
    i = int(np.argmin(xyz[:, 0]))
    assert np.allclose(xyz[i], [0.3, 1.1 / 3, 1.5 / 3], atol=1e-6) and c[i] == 3.0


def test_new_points_are_exactly_the_new_voxels():
    g = GlobalMap(_cfg(voxel_size=0.5))
    rng = np.random.default_rng(0)
    seen = 0
    for f in range(5):
        pts = rng.uniform(-3, 3, (500, 3)).astype(np.float32)
        res = g.integrate(pts, np.zeros((500, 3), np.uint8), np.full(500, 2.0, np.float32), f)
        seen += len(res.new_points)
        assert seen == len(g)


@pytest.mark.parametrize("policy", ["coarsen", "evict"])
def test_point_budget_holds_over_a_long_run(policy):
    g = GlobalMap(_cfg(voxel_size=0.05, max_points=3000, budget_policy=policy))
    rng = np.random.default_rng(1)
    for f in range(60):  # the scene keeps growing: a walk along x
        pts = rng.uniform(0, 1, (2000, 3)).astype(np.float32) + np.array([f * 0.5, 0, 0], np.float32)
        g.integrate(pts, np.full((2000, 3), 7, np.uint8), np.full(2000, 2.0, np.float32), f)
        assert len(g) <= 3000
    xyz, rgb, _ = g.points()
    assert (rgb == 7).all()
    if policy == "coarsen":
        assert g.voxel_size > 0.05 and g.coarsenings >= 1
        assert xyz[:, 0].min() < 1 and xyz[:, 0].max() > 29  # the whole walk is kept, coarser
    else:
        assert g.evicted > 0 and xyz[:, 0].min() > 10  # the oldest part of the walk is gone
    assert g.nbytes() < 3000 * 200 * 4  # bounded storage


def test_ply_round_trip(tmp_path):
    import trimesh

    rng = np.random.default_rng(2)
    xyz = rng.normal(size=(100, 3)).astype(np.float32)
    rgb = rng.integers(0, 255, (100, 3), dtype=np.uint8)
    conf = rng.uniform(1, 5, 100).astype(np.float32)
    write_ply(tmp_path / "m.ply", xyz, rgb, conf)
    back = read_ply(tmp_path / "m.ply")
    assert np.array_equal(np.stack([back["x"], back["y"], back["z"]], 1), xyz)
    assert np.array_equal(back["confidence"], conf)
    cloud = trimesh.load(tmp_path / "m.ply")
    assert np.allclose(cloud.vertices, xyz) and np.array_equal(np.asarray(cloud.colors)[:, :3], rgb)


def test_glb_is_valid_gltf_and_reads_back(tmp_path):
    import trimesh

    rng = np.random.default_rng(3)
    xyz = rng.normal(size=(50, 3)).astype(np.float32)
    rgb = rng.integers(0, 255, (50, 3), dtype=np.uint8)
    path = np.cumsum(rng.normal(size=(7, 3)), 0)
    write_glb(tmp_path / "m.glb", xyz, rgb, path_xyz=path)
    raw = (tmp_path / "m.glb").read_bytes()
    magic, version, length = struct.unpack("<III", raw[:12])
    assert magic == 0x46546C67 and version == 2 and length == len(raw) and length % 4 == 0
    n_json = struct.unpack("<I", raw[12:16])[0]
    gltf = json.loads(raw[20:20 + n_json])
    y_up = xyz * np.array([1, -1, -1], np.float32)  # glTF is y-up: (x, -y, -z) of the OpenCV world
    pos = gltf["accessors"][gltf["meshes"][0]["primitives"][0]["attributes"]["POSITION"]]
    assert pos["count"] == 50 and np.allclose(pos["min"], y_up.min(0)) and np.allclose(pos["max"], y_up.max(0))
    scene = trimesh.load(tmp_path / "m.glb")
    geoms = list(scene.geometry.values())
    clouds = [g for g in geoms if isinstance(g, trimesh.PointCloud)]
    assert len(clouds) == 1 and np.allclose(clouds[0].vertices, y_up, atol=1e-6)
    assert np.array_equal(np.asarray(clouds[0].colors)[:, :3], rgb)
    lines = [g for g in geoms if isinstance(g, trimesh.path.Path3D)]  # the camera path, in the same axes
    assert len(lines) == 1 and np.allclose(np.unique(lines[0].vertices, axis=0),
                                           np.unique((path * [1, -1, -1]).astype(np.float32), axis=0), atol=1e-5)


def test_glb_shows_a_floor_below_the_camera_upright(tmp_path):
    """A floor 1.5 m below a level OpenCV camera (y down) is below it in glTF (y up), and in front of it."""
    import trimesh

    u, v = np.meshgrid(np.linspace(-2, 2, 10), np.linspace(1, 5, 10))
    floor = np.stack([u.ravel(), np.full(u.size, 1.5), v.ravel()], 1)  # y = +1.5: below, z > 0: ahead
    write_glb(tmp_path / "floor.glb", floor, np.full((len(floor), 3), 128, np.uint8),
              path_xyz=np.array([[0, 0, 0], [0, 0, 1.0]]))
    cloud = next(g for g in trimesh.load(tmp_path / "floor.glb").geometry.values() if isinstance(g, trimesh.PointCloud))
    assert np.allclose(cloud.vertices[:, 1], -1.5)  # below the camera in a y-up viewer
    assert (cloud.vertices[:, 2] < 0).all()  # glTF cameras look down -z: the floor is in front


def test_tum_round_trip_and_evo_files(tmp_path, shared):
    from streamrecon.mapping.export import quat_xyzw_to_matrix

    rng = np.random.default_rng(4)
    q = rng.normal(size=(20, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    T = np.tile(np.eye(4), (20, 1, 1))
    T[:, :3, :3] = quat_xyzw_to_matrix(q)
    T[:, :3, 3] = rng.normal(size=(20, 3))
    stamps = 1403715273.262142976 + np.arange(20) * 0.05
    write_tum(tmp_path / "t.txt", stamps, T)
    lines = [ln for ln in (tmp_path / "t.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 20 and all(len(ln.split()) == 8 for ln in lines)
    s2, T2 = read_tum(tmp_path / "t.txt")
    assert np.allclose(s2, stamps, atol=1e-6) and np.allclose(T2, T, atol=1e-7)
    # the qw >= 0 convention does not change the rotation; the field order is x y z w
    s_gt, T_gt = read_tum(shared / "data" / "trajectories_evo_testdata" / "freiburg1_xyz-groundtruth.txt")
    assert len(s_gt) == 3000 and np.allclose(np.linalg.det(T_gt[:, :3, :3]), 1.0, atol=1e-6)


def test_numpy_quaternions_agree_with_the_torch_pose_code():
    import torch

    from streamrecon.geometry import matrix_to_quat_wxyz, quat_wxyz_to_matrix
    from streamrecon.mapping.export import matrix_to_quat_xyzw, quat_xyzw_to_matrix

    q = np.random.default_rng(5).normal(size=(200, 4))
    R = quat_wxyz_to_matrix(torch.from_numpy(q)).numpy()
    assert np.allclose(quat_xyzw_to_matrix(q[:, [1, 2, 3, 0]]), R)
    assert np.allclose(matrix_to_quat_xyzw(R), matrix_to_quat_wxyz(torch.from_numpy(R)).numpy()[:, [1, 2, 3, 0]])
