"""Evaluation metrics with known answers (and evo's published numbers on real trajectories)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamrecon.eval.metrics import associate, ate, depth_metrics, map_metrics, rpe, umeyama
from streamrecon.mapping import read_tum
from streamrecon.mapping.export import quat_xyzw_to_matrix


def _random_traj(n=40, seed=0):
    rng = np.random.default_rng(seed)
    T = np.tile(np.eye(4), (n, 1, 1))
    q = rng.normal(size=(n, 4))
    T[:, :3, :3] = quat_xyzw_to_matrix(q)
    T[:, :3, 3] = np.cumsum(rng.normal(scale=0.1, size=(n, 3)), 0)
    return T


def test_depth_metrics():
    rng = np.random.default_rng(0)
    gt = rng.uniform(1, 5, (20, 30))
    valid = np.ones_like(gt, bool)
    m = depth_metrics(2 * gt, gt, valid)
    assert m["abs_rel"] < 1e-12 and m["delta1"] == 1.0 and np.isclose(m["abs_rel_metric"], 1.0)
    assert m["delta1_metric"] == 0.0 and np.isclose(m["scale"], 0.5)
    noisy = gt * (1 + 0.1 * np.sign(rng.normal(size=gt.shape)))
    assert np.isclose(depth_metrics(noisy, gt, valid)["abs_rel_metric"], 0.1)
    assert math.isnan(depth_metrics(gt, gt, np.zeros_like(valid))["abs_rel"])


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(50, 3))
    R = quat_xyzw_to_matrix(rng.normal(size=(1, 4)))[0]
    dst = (2.5 * (R @ src.T)).T + np.array([1.0, -2.0, 0.5])
    s, R2, t = umeyama(src, dst, True)
    assert np.isclose(s, 2.5) and np.allclose(R2, R) and np.allclose(t, [1.0, -2.0, 0.5])


def test_ate_and_rpe_known_answers():
    gt = _random_traj()
    est = gt.copy()
    est[:, :3, 3] = 0.5 * gt[:, :3, 3] + 3.0  # a scaled, shifted copy
    assert ate(est, gt, True)["rmse"] < 1e-9 and np.isclose(ate(est, gt, True)["scale"], 2.0)
    assert ate(est, gt, False)["rmse"] > 0.01
    assert rpe(gt, gt)["trans_rmse"] < 1e-12 and rpe(gt, gt)["rot_rmse_deg"] < 1e-6
    assert rpe(est, gt, with_scale=True)["trans_rmse"] < 1e-9
    assert ate(gt, gt, True)["percent_of_path"] < 1e-9


def test_ate_matches_evo_on_tum_fr1_xyz(shared):
    """The data README lists evo's Sim(3) ATE for these files: 9.8 mm (ORB mono) and 13.4 mm (RGBD-SLAM)."""
    d = shared / "data" / "trajectories_evo_testdata"
    t_gt, T_gt = read_tum(d / "freiburg1_xyz-groundtruth.txt")
    for name, expected in (("freiburg1_xyz-ORB_kf_mono.txt", 0.0098), ("freiburg1_xyz-rgbdslam.txt", 0.0134)):
        t_est, T_est = read_tum(d / name)
        ia, ib = associate(t_est, t_gt, 0.01)
        assert len(ia) > 20
        result = ate(T_est[ia], T_gt[ib], with_scale=True)
        assert result["rmse"] == pytest.approx(expected, abs=0.00051), name


def test_map_metrics():
    rng = np.random.default_rng(2)
    cloud = rng.uniform(size=(2000, 3))
    m = map_metrics(cloud, cloud)
    assert m["accuracy"] < 1e-6 and m["completeness"] < 1e-6
    g = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0), [0.0]), -1).reshape(-1, 3)
    m = map_metrics(g + np.array([0.0, 0.0, 1.0]), g)  # a parallel grid 1 m away
    assert np.isclose(m["accuracy"], 1.0) and np.isclose(m["completeness"], 1.0)
    half = map_metrics(g[g[:, 0] < 10], g)  # predicted only half of the scene: accurate, not complete
    assert half["accuracy"] < 1e-6 and half["completeness"] > 2
    assert half["precision"] == 1.0 and half["coverage"] == 0.5 and np.isclose(half["fscore"], 2 / 3)
    assert m["precision"] == m["coverage"] == m["fscore"] == 0.0 and m["map_points"] == len(g)


def test_map_metrics_do_not_reward_a_degenerate_map():
    """A wall (what the demo sequence mostly sees): a map collapsed onto one spot of it is perfectly
    accurate, and nothing else. Coverage and the F-score tell it from a real reconstruction."""
    rng = np.random.default_rng(5)
    u, v = np.meshgrid(np.linspace(-2, 2, 80), np.linspace(-1.5, 1.5, 60))
    wall = np.stack([u.ravel(), v.ravel(), np.full(u.size, 3.0)], 1)
    good = map_metrics(wall + rng.normal(scale=0.005, size=wall.shape), wall)
    spot = map_metrics(np.repeat(wall[wall.shape[0] // 2][None], 50, 0), wall)  # 50 points at one place
    patch = map_metrics(wall[(np.abs(wall[:, 0]) < 0.3) & (np.abs(wall[:, 1]) < 0.3)], wall)
    assert spot["accuracy"] < 1e-9 < good["accuracy"]  # accuracy alone ranks the collapsed map first
    assert spot["coverage"] < 0.01 and spot["fscore"] < 0.02 and spot["completeness"] > 1.0
    assert good["coverage"] > 0.99 and good["fscore"] > 0.99
    assert spot["fscore"] < patch["fscore"] < good["fscore"] and patch["precision"] == 1.0
    empty = map_metrics(np.zeros((0, 3)), wall)
    assert np.isnan(empty["fscore"]) and empty["map_points"] == 0
