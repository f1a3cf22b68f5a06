"""Real development sequences (SUN3D, KITTI 06, APC): loaders checked against the data README's facts,
the trajectory baselines, and one per-backend evaluation end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamrecon.eval.baselines import RANDOM_WALK_SEEDS, identity_trajectory, random_walk_like, step_angles_deg, step_lengths
from streamrecon.eval.datasets import detect_format, find_sequences
from streamrecon.eval.metrics import ate, path_length, rpe, trajectory_metrics


def _K(fx, fy, cx, cy):
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])


@pytest.fixture(scope="module")
def data(shared):
    return shared / "data"


def _is_rotation(T):
    R = T[:, :3, :3]
    return np.allclose(R @ np.swapaxes(R, 1, 2), np.eye(3), atol=1e-4) and np.allclose(np.linalg.det(R), 1, atol=1e-4)


def test_sun3d_fragments(data):
    seqs = find_sequences(data / "sun3d_studyroom")
    assert [s.name for s in seqs] == ["fragment-1-rgbd-frames", "fragment-2-rgbd-frames"]
    facts = {"fragment-1-rgbd-frames": (935, 0.554, 26.6, 3.6), "fragment-2-rgbd-frames": (3160, 0.748, 17.0, 2.3)}
    for s in seqs:
        first, length, rot, median_depth = facts[s.name]
        assert s.fmt == "sun3d" and s.has_depth and len(s) == 50
        assert np.allclose(s.K, _K(570.342205, 570.342205, 320.0, 240.0))
        assert s.rgb(0).shape == (480, 640, 3) and s.rgb(0).dtype == np.uint8
        assert path_length(s.T_wc) == pytest.approx(length, abs=0.001)
        assert step_angles_deg(s.T_wc).sum() == pytest.approx(rot, abs=0.1)
        assert _is_rotation(s.T_wc)
        assert np.allclose(s.stamps, (first + np.arange(50)) / 30.0)  # as groundtruth_tum_*.txt
        d = s.depth(10)
        assert d.shape == (480, 640) and d.dtype == np.float32
        assert 0.7 < (d > 0).mean() and d.max() < 10
        assert np.median(d[d > 0]) == pytest.approx(median_depth, abs=0.4)
    # one fragment folder on its own is detected too (its intrinsics are in the parent folder)
    assert detect_format(data / "sun3d_studyroom" / "fragment-2-rgbd-frames") == "sun3d"


def test_sun3d_poses_match_the_derived_tum_file(data):
    from streamrecon.mapping import read_tum

    s = find_sequences(data / "sun3d_studyroom" / "fragment-2-rgbd-frames")[0]
    stamps, T = read_tum(data / "sun3d_studyroom" / "groundtruth_tum_fragment-2.txt")
    assert np.allclose(stamps, s.stamps, atol=1e-5) and np.allclose(T, s.T_wc, atol=1e-5)


def test_kitti06(data):
    (s,) = find_sequences(data / "kitti06_f0000_0050")
    assert s.fmt == "kitti" and not s.has_depth and len(s) == 51
    assert np.allclose(s.K, _K(707.0912, 707.0912, 601.8873, 183.1104))
    im = s.rgb(3)
    assert im.shape == (370, 1226, 3) and im.dtype == np.uint8
    assert np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 0], im[..., 2])  # grey stacked
    assert path_length(s.T_wc) == pytest.approx(59.86, abs=0.01)
    assert step_angles_deg(s.T_wc).sum() == pytest.approx(4.0, abs=0.3)
    assert np.allclose(s.T_wc[0], np.eye(4), atol=1e-6) and _is_rotation(s.T_wc)
    assert s.T_wc[-1, 2, 3] > 55  # drives forward along the camera's z
    assert s.stamps[0] == 0 and s.stamps[1] == pytest.approx(0.1044989) and np.all(np.diff(s.stamps) > 0.09)
    d = s.depth(0)
    assert d.shape == (370, 1226) and not d.any()


def test_apc_scene(data):
    (s,) = find_sequences(data / "apc_shelf_scene0000")
    assert s.fmt == "apc" and s.has_depth and len(s) == 15
    assert np.allclose(s.K, _K(615.19519, 615.195251, 298.442688, 247.519196))
    assert s.rgb(0).shape == (480, 640, 3)
    assert path_length(s.T_wc) == pytest.approx(1.034, abs=0.001)
    assert step_angles_deg(s.T_wc).sum() == pytest.approx(170.1, abs=0.2)
    assert _is_rotation(s.T_wc)
    assert np.allclose(s.T_wc[0, :3, 3], [1.17166368, -0.163231, 1.15679915])  # cam.info.txt, frame-000000
    for i in (0, 14):
        d = s.depth(i)
        z = d[d > 0]
        # close range (a shelf bin a robot arm looks into, foam pads ~10 cm from the lens): the bit-shift
        # decoding gives 0.09 - 1.9 m; without it the values would be ~4 m (raw / 10000) or nonsense
        assert 0.1 < (d > 0).mean() < 0.9 and z.min() > 0.05 and z.max() < 2.0
        assert 0.3 < np.median(z) < 0.8


def test_seven_scenes_still_detected_without_intrinsics_file(tmp_path):
    for i in range(2):
        np.savetxt(tmp_path / f"frame-{i:06d}.pose.txt", np.eye(4))
    assert detect_format(tmp_path) == "7scenes"
    (tmp_path / "camera-intrinsics.txt").write_text("500 0 320\n0 500 240\n0 0 1\n")
    assert detect_format(tmp_path) == "sun3d"


def _wild_trajectory(n=30, seed=3):
    """Random steps of 1 mm - 10 cm with rotations of 0.1 - 170 degrees about random axes."""
    from streamrecon.eval.baselines import _axis_angle

    rng = np.random.default_rng(seed)
    T = identity_trajectory(n)
    axes = rng.normal(size=(n - 1, 3))
    steps = _axis_angle(axes / np.linalg.norm(axes, axis=1, keepdims=True), np.radians(rng.uniform(0.1, 170, n - 1)))
    for i in range(n - 1):
        T[i + 1, :3, :3] = T[i, :3, :3] @ steps[i]
    T[1:, :3, 3] = np.cumsum(rng.normal(size=(n - 1, 3)) * rng.uniform(0.001, 0.1, (n - 1, 1)), 0)
    return T


def test_random_walk_keeps_step_lengths_and_angles(data):
    gt = find_sequences(data / "apc_shelf_scene0000")[0].T_wc  # large rotations (up to ~25 deg per step)
    for src in (gt, _wild_trajectory()):
        for seed in (0, 7):
            w = random_walk_like(src, seed)
            assert w.shape == src.shape and _is_rotation(w)
            assert np.allclose(step_lengths(w), step_lengths(src), rtol=0, atol=1e-12)
            assert np.allclose(step_angles_deg(w), step_angles_deg(src), rtol=0, atol=1e-6)
    assert np.array_equal(random_walk_like(identity_trajectory(6), 3), identity_trajectory(6))  # no motion, no walk
    a, b = random_walk_like(gt, 0), random_walk_like(gt, 1)
    assert not np.allclose(a[:, :3, 3], b[:, :3, 3]) and not np.allclose(a[:, :3, :3], b[:, :3, :3])
    assert np.array_equal(random_walk_like(gt, 5), random_walk_like(gt, 5))
    # random directions: the walk ends much nearer its start than the (nearly straight) source path's length
    kitti = find_sequences(data / "kitti06_f0000_0050")[0].T_wc
    ends = [np.linalg.norm(random_walk_like(kitti, s)[-1, :3, 3]) for s in range(RANDOM_WALK_SEEDS)]
    assert np.mean(ends) < 0.5 * np.linalg.norm(kitti[-1, :3, 3])


def test_identity_baseline_metrics_are_finite(data):
    gt = find_sequences(data / "sun3d_studyroom" / "fragment-2-rgbd-frames")[0].T_wc
    ident = identity_trajectory(len(gt))
    assert ident.shape == (50, 4, 4) and np.array_equal(ident[7], np.eye(4))
    sim3 = ate(ident, gt, True)
    assert all(math.isfinite(sim3[k]) for k in ("rmse", "scale", "percent_of_path"))
    # the spread of the GT centres around their centroid
    c = gt[:, :3, 3]
    assert sim3["rmse"] == pytest.approx(np.sqrt(((c - c.mean(0)) ** 2).sum(1).mean()))
    assert ate(ident, gt, False)["rmse"] == pytest.approx(sim3["rmse"])
    m = trajectory_metrics(ident, gt)
    assert all(math.isfinite(v) for v in m.values())
    # the ground truth scores zero; a NaN estimate scores NaN instead of raising
    assert trajectory_metrics(gt, gt)["ate_sim3"] < 1e-9 and trajectory_metrics(gt, gt)["rpe_rot_deg"] < 1e-4
    bad = gt.copy()
    bad[3, 0, 3] = np.nan
    assert math.isnan(ate(bad, gt, True)["rmse"]) and math.isnan(rpe(bad, gt)["trans_rmse"])


@pytest.fixture(scope="module")
def loaded():
    from streamrecon.pipeline import load_resolved
    from streamrecon.settings import EngineSettings
    from streamrecon.weights import bundled_weights

    path = bundled_weights()
    assert path is not None, "the bundled model is missing"
    return load_resolved(EngineSettings(weights=str(path), device="cpu"))


def test_evaluate_backends_end_to_end(data, loaded):
    from streamrecon.eval.real import evaluate_backends, format_real_report

    seqs = find_sequences(data / "sun3d_studyroom" / "fragment-2-rgbd-frames")
    report = evaluate_backends(loaded, seqs, backends=("none", "no-such-backend"), max_frames=5, size=160)
    (s,) = report["sequences"]
    assert s["frames"] == 5 and s["has_depth"] and s["path_length"] == pytest.approx(path_length(seqs[0].T_wc[:5]))
    rows = {r["label"]: r for r in s["rows"]}
    none = rows["none"]
    for k in ("ate_sim3", "ate_sim3_pct", "ate_se3", "rpe_rot_deg", "rpe_trans", "sim3_scale", "abs_rel", "delta1",
              "ms_per_frame"):
        assert math.isfinite(none[k]) and none[k] >= 0, k
    assert 0 <= none["delta1"] <= 1 and none["ms_per_frame"] > 0
    assert "error" in rows["no-such-backend"]  # an error row, not a crash
    walk = rows[f"random walk (none steps, {RANDOM_WALK_SEEDS} seeds)"]
    ident, const = rows["identity"], rows["constant depth"]
    assert all(math.isfinite(r["ate_sim3"]) for r in (walk, ident))
    assert math.isfinite(const["abs_rel"]) and 0 < const["abs_rel"] < 1 and math.isnan(const["ate_sim3"])
    assert math.isnan(walk["abs_rel"]) and math.isnan(ident["abs_rel"])
    # nothing Sim(3)-aligned can be worse than no motion at all
    assert none["ate_sim3"] <= ident["ate_sim3"] + 1e-9 and walk["ate_sim3"] <= ident["ate_sim3"] + 1e-9
    text = format_real_report(report)
    for label in ("none", "identity", "random walk", "constant depth", "no-such-backend", "error", "ATE Sim3 %"):
        assert label in text, label
    assert text.count("\n|") >= 7  # header, rule, 2 backends, 3 baselines
