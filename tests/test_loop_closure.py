"""Loop closure: Sim(3) algebra, the pose graph on a drifting loop, place recognition, verification,
the loop closer end to end, the map rebuild and the final global alignment."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("gtsam")

from streamrecon.mapping import GlobalMap, MapConfig  # noqa: E402
from streamrecon.slam.loop import KeyframeInput, LoopCloser, LoopConfig  # noqa: E402
from streamrecon.slam.places import PlaceDatabase  # noqa: E402
from streamrecon.slam.refine import refined_trajectory  # noqa: E402
from streamrecon.slam.sim3 import (  # noqa: E402
    LoopEdge,
    optimize_pose_graph,
    sim3,
    sim3_apply,
    sim3_inv,
    sim3_parts,
    umeyama,
)


def _rot(v) -> np.ndarray:
    return cv2.Rodrigues(np.asarray(v, np.float64))[0]


def test_sim3_compose_inverse_apply():
    A = sim3(_rot([0.1, -0.4, 0.2]), [1.0, -2.0, 0.5], 1.7)
    B = sim3(_rot([-0.3, 0.2, 0.05]), [0.2, 0.1, -1.0], 0.6)
    X = np.random.default_rng(0).normal(size=(20, 3))
    np.testing.assert_allclose(sim3_apply(A @ B, X), sim3_apply(A, sim3_apply(B, X)), atol=1e-12)
    np.testing.assert_allclose(sim3_inv(A) @ A, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(sim3_apply(sim3_inv(A), sim3_apply(A, X)), X, atol=1e-12)
    R, t, s = sim3_parts(A @ B)
    assert s == pytest.approx(1.7 * 0.6)
    np.testing.assert_allclose(R, _rot([0.1, -0.4, 0.2]) @ _rot([-0.3, 0.2, 0.05]), atol=1e-12)
    with pytest.raises(ValueError):
        sim3_parts(np.diag([1.0, 1.0, -1.0, 1.0]))


def test_umeyama_recovers_a_similarity():
    S = sim3(_rot([0.3, 0.1, -0.2]), [0.5, -1.0, 2.0], 2.5)
    X = np.random.default_rng(1).normal(size=(50, 3))
    np.testing.assert_allclose(umeyama(X, sim3_apply(S, X)), S, atol=1e-9)
    rigid = umeyama(X, sim3_apply(S, X), with_scale=False)
    assert sim3_parts(rigid)[2] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        umeyama(X[:2], X[:2])


def _circle(n: int = 40, radius: float = 3.0) -> list[np.ndarray]:
    return [sim3(_rot([0, -2 * np.pi * k / n, 0]), [radius * np.cos(2 * np.pi * k / n), 0,
                                                     radius * np.sin(2 * np.pi * k / n)]) for k in range(n)]


def _drifted(gt: list[np.ndarray], rot=(0, 0.01, 0.004), scale=1.01) -> list[np.ndarray]:
    """Odometry that rotates a little and grows a little each step (known drift)."""
    drift = sim3(_rot(rot), np.zeros(3), scale)
    est = [gt[0]]
    for k in range(1, len(gt)):
        est.append(est[-1] @ sim3_inv(gt[k - 1]) @ gt[k] @ drift)
    return est


def _pos_err(P, gt) -> float:
    return float(np.mean([np.linalg.norm(a[:3, 3] - b[:3, 3]) for a, b in zip(P, gt)]))


def test_pose_graph_corrects_a_drifting_loop():
    gt = _circle()
    est = _drifted(gt)
    n = len(gt)
    loop = LoopEdge(n - 1, 0, sim3_inv(gt[n - 1]) @ gt[0], 100)
    res = optimize_pose_graph(list(range(n)), est, [loop])
    opt = [res.poses[k] for k in range(n)]
    before, after = _pos_err(est, gt), _pos_err(opt, gt)
    assert before > 0.8  # the drift is real
    assert after < before / 2.5
    np.testing.assert_allclose(opt[0], est[0], atol=1e-9)  # the gauge stays fixed
    # the loop constraint now holds: the last keyframe sees the first where the loop edge says
    closure = sim3_inv(opt[n - 1]) @ opt[0]
    open_gap = np.linalg.norm((sim3_inv(est[n - 1]) @ est[0])[:3, 3] - loop.S_ij[:3, 3])
    assert np.linalg.norm(closure[:3, 3] - loop.S_ij[:3, 3]) < open_gap / 10
    scale_gap = abs(np.log(sim3_parts(sim3_inv(est[n - 1]) @ est[0])[2]))
    assert abs(np.log(sim3_parts(closure)[2])) < scale_gap / 3  # the scale drift is mostly undone
    assert res.final_error < res.initial_error / 10
    # without a loop edge the graph has nothing to correct
    same = optimize_pose_graph(list(range(n)), est, [])
    assert _pos_err([same.poses[k] for k in range(n)], est) < 1e-6


def test_pose_graph_rejects_bad_input():
    with pytest.raises(ValueError):
        optimize_pose_graph([0], [np.eye(4)], [])


def test_refined_trajectory_follows_the_reference_keyframe():
    poses = np.stack([sim3(np.eye(3), [k, 0, 0]) for k in range(6)])
    C = sim3(_rot([0, 0.2, 0]), [0, 1.0, 0], 2.0)
    kf_ids = np.array([0, 3])
    out = refined_trajectory(poses, kf_ids, poses[kf_ids], np.stack([poses[0], C @ poses[3]]))
    np.testing.assert_allclose(out[:3], poses[:3], atol=1e-12)  # frames 0-2 follow keyframe 0 (unchanged)
    R, t, s = sim3_parts(C)
    for k in (3, 4, 5):  # frames 3-5 follow keyframe 3: rotated, moved, their positions scaled
        np.testing.assert_allclose(out[k, :3, :3], R @ poses[k, :3, :3], atol=1e-12)
        np.testing.assert_allclose(out[k, :3, 3], s * R @ poses[k, :3, 3] + t, atol=1e-12)
        assert np.linalg.det(out[k, :3, :3]) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- images

def _texture(seed: int, h: int = 480, w: int = 1400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 255, (h // 8, w // 8), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(300):
        c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, c, int(rng.integers(3, 25)), int(rng.integers(0, 255)), -1)
        cv2.rectangle(img, c, (c[0] + int(rng.integers(5, 40)), c[1] + int(rng.integers(5, 40))),
                      int(rng.integers(0, 255)), 2)
    return img


def test_place_database_finds_the_same_place():
    """Crops of one wall come back to their own place, not to another wall's."""
    orb = cv2.ORB_create(500)
    walls = [_texture(s) for s in (1, 2, 3)]
    for kind_bow in (True,):
        db = PlaceDatabase("bow", vocab_keyframes=6)
        kid = 0
        where = {}
        for wi, wall in enumerate(walls):
            for x in (0, 300, 600):
                _, d = orb.detectAndCompute(wall[:, x:x + 640], None)
                db.add(kid, d)
                where[kid] = (wi, x)
                kid += 1
        assert len(db.ids) == 9 and db.vocab is not None
        hits = 0
        for wi, wall in enumerate(walls):
            _, d = orb.detectAndCompute(wall[:, 310:950], None)  # near x = 300 of this wall
            best = db.query(d, before=kid, top=1)[0][0]
            hits += where[best] == (wi, 300)
        assert kind_bow and hits == 3
        db.remove({0, 1})
        assert 0 not in db.ids and len(db.ids) == 7


def test_place_database_tokens_and_bad_kind():
    db = PlaceDatabase("tokens")
    rng = np.random.default_rng(0)
    base = rng.normal(size=64)
    vecs = [base + rng.normal(size=64) * 0.1 + 3 * np.eye(64)[k] for k in range(5)]
    for k, v in enumerate(vecs):
        db.add(k, v)
    assert db.query(vecs[3] + rng.normal(size=64) * 0.05, before=10, top=1)[0][0] == 3
    assert db.query(vecs[3], before=3, top=5) and all(k < 3 for k, _ in db.query(vecs[3], before=3, top=5))
    with pytest.raises(ValueError, match="place descriptor"):
        PlaceDatabase("nope")


# ---------------------------------------------------------------------------------------------- closer

K_TRACK = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])


def _view(T_wc: np.ndarray, wall: np.ndarray, depth: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """A 640x480 camera looking at a textured plane ``z = depth`` (world), and per-pixel depth."""
    Tcw = sim3_inv(T_wc)
    # plane points: X = (u_w, v_w, depth) with wall pixels at 100 px per metre, centred
    H_w = np.array([[1 / 100.0, 0, -wall.shape[1] / 200.0], [0, 1 / 100.0, -wall.shape[0] / 200.0], [0, 0, 1]])
    P = K_TRACK @ Tcw[:3, :4]
    M = P @ np.array([[1, 0, 0], [0, 1, 0], [0, 0, depth], [0, 0, 1]]) @ H_w
    img = cv2.warpPerspective(wall, M, (640, 480), flags=cv2.INTER_LINEAR)
    v, u = np.mgrid[0:480, 0:640]
    rays = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3) @ np.linalg.inv(K_TRACK).T
    d_w = rays @ T_wc[:3, :3].T
    lam = (depth - T_wc[2, 3]) / d_w[:, 2]
    z = (lam * rays[:, 2]).reshape(480, 640)
    return img, z


def _keyframe(kid: int, T_true: np.ndarray, T_est: np.ndarray, wall: np.ndarray, epoch: int = 0) -> KeyframeInput:
    img, z = _view(T_true, wall)
    corners = cv2.goodFeaturesToTrack(img, 400, 0.005, 10).reshape(-1, 2).astype(np.float32)
    zc = z[corners[:, 1].astype(int), corners[:, 0].astype(int)]
    X = (np.c_[corners, np.ones(len(corners))] @ np.linalg.inv(K_TRACK).T) * zc[:, None]
    cloud = (np.stack(np.meshgrid(np.arange(0, 640, 16), np.arange(0, 480, 16)), -1).reshape(-1, 2)).astype(float)
    zz = z[cloud[:, 1].astype(int), cloud[:, 0].astype(int)]
    cloud3 = ((np.c_[cloud, np.ones(len(cloud))] @ np.linalg.inv(K_TRACK).T) * zz[:, None]).astype(np.float32)
    return KeyframeInput(
        kid=kid, epoch=epoch, T_wc=T_est, grey=img, K=K_TRACK, cloud=cloud3,
        colors=np.full((len(cloud3), 3), 128, np.uint8), conf=np.full(len(cloud3), 5.0, np.float32),
        lm_px=corners, lm_X=X.astype(np.float32))


def _sweep(n_out: int = 14):
    """A camera that pans along a wall and comes back: true poses and drifted estimates."""
    xs = list(np.linspace(0, 2.6, n_out)) + list(np.linspace(2.6, 0.05, n_out))[1:]
    gt = [sim3(_rot([0, 0.02 * np.sin(k), 0]), [x, 0, 0]) for k, x in enumerate(xs)]
    est = _drifted(gt, rot=(0, 0.0, 0.004), scale=1.0)
    for k in range(len(est)):  # plus a translation drift along the path
        est[k] = est[k] @ sim3(np.eye(3), [0.012 * k, 0.006 * k, 0])
    return gt, est


def test_loop_closer_closes_the_loop_and_rebuilds_the_map():
    wall = _texture(7)
    gt, est = _sweep()
    cfg = MapConfig(voxel_size=0.05, conf_thresh=1.0)
    closer = LoopCloser(LoopConfig(min_gap=8, min_inliers=25), map_factory=lambda: GlobalMap(cfg), sync=True)
    for k, (Tg, Te) in enumerate(zip(gt, est)):
        closer.submit(_keyframe(k, Tg, Te, wall))
    out = closer.poll()
    st = closer.to_dict()
    assert st["closures"] >= 1, st
    corrections = [o for o in out if type(o).__name__ == "Correction"]
    rebuilds = [o for o in out if type(o).__name__ == "MapRebuild"]
    assert corrections and rebuilds and len(rebuilds[-1].gmap) > 0
    ids, S = closer.keyframe_poses()
    assert list(ids) == list(range(len(gt)))
    before = np.linalg.norm(est[-1][:3, 3] - gt[-1][:3, 3])
    after = np.linalg.norm(S[-1][:3, 3] - gt[-1][:3, 3])
    assert before > 0.3 and after < before / 3, (before, after)
    # every verified edge relates two keyframes as the ground truth does
    for e in closer.loops:
        true = sim3_inv(gt[e.i]) @ gt[e.j]
        assert np.linalg.norm(e.S_ij[:3, 3] - true[:3, 3]) < 0.1
        assert sim3_parts(e.S_ij)[2] == pytest.approx(1.0, abs=0.05)


def test_loop_closer_brings_stale_keyframes_forward_and_never_matches_noise():
    wall = _texture(7)
    gt, est = _sweep()
    closer = LoopCloser(LoopConfig(min_gap=8), sync=True)
    for k in range(len(gt) - 3):
        closer.submit(_keyframe(k, gt[k], est[k], wall))
    assert closer.epoch >= 1
    C = np.eye(4)
    for c in closer._corrections:  # every correction since epoch 0, oldest first
        C = c @ C
    k = len(gt) - 3
    closer.submit(_keyframe(k, gt[k], est[k], wall, epoch=0))  # made before the stage saw the corrections
    np.testing.assert_allclose(closer.db[k].S_wk, C @ est[k], atol=1e-9)
    assert not np.allclose(closer.db[k].S_wk, est[k])
    # noise images: no loop, no crash; a black frame (no features) is harmless too
    rng = np.random.default_rng(3)
    quiet = LoopCloser(LoopConfig(min_gap=3), sync=True)
    for k in range(8):
        kf = _keyframe(k, gt[0], gt[0], wall)
        img = rng.integers(0, 255, (480, 640), dtype=np.uint8) if k % 2 else np.zeros((480, 640), np.uint8)
        quiet.submit(KeyframeInput(**{**kf.__dict__, "grey": img, "lm_px": None, "lm_X": None}))
    assert quiet.to_dict()["closures"] == 0 and quiet.to_dict()["errors"] == 0


def test_loop_closer_database_is_bounded():
    wall = _texture(5)
    closer = LoopCloser(LoopConfig(max_keyframes=10, min_gap=10 ** 6), sync=True)
    for k in range(25):
        closer.submit(_keyframe(k, sim3(np.eye(3), [0.02 * k, 0, 0]), sim3(np.eye(3), [0.02 * k, 0, 0]), wall))
    assert len(closer.db) <= 10
    assert closer.to_dict()["culled"] >= 15
    assert closer.order == sorted(closer.order) and closer.order[-1] == 24


def test_loop_closer_thread_flushes_and_closes():
    wall = _texture(7)
    gt, est = _sweep()
    closer = LoopCloser(LoopConfig(min_gap=8))
    for k, (Tg, Te) in enumerate(zip(gt, est)):
        closer.submit(_keyframe(k, Tg, Te, wall))
    assert closer.flush(timeout=120)
    assert closer.stats.processed == len(gt)
    closer.close()
    assert closer.stats.closures >= 1


# ---------------------------------------------------------------------------------------------- pipeline

def test_slam_pipeline_on_real_video_closes_the_loop_and_writes_refined_outputs(shared, tmp_path):
    """SUN3D fragment-1 played there and back (a real revisit) through ``--backend slam --refine`` with
    the random-weight golden network: a loop is closed, the map is rebuilt from the keyframes, the
    keyframe / optimised / refined outputs are written, and every trajectory stays far better than
    the network alone."""
    from streamrecon.engine import Frame
    from streamrecon.eval.datasets import find_sequences
    from streamrecon.eval.metrics import ate
    from streamrecon.mapping import read_tum
    from streamrecon.pipeline import LoadedModel, build_pipeline
    from streamrecon.settings import OutputSettings, PipelineConfig, SlamSettings

    from .node_helpers import tiny_model

    seq = [s for s in find_sequences(shared / "data" / "sun3d_studyroom") if "fragment-1" in s.name][0].there_and_back()
    K = seq.K
    intr = f"{K[0, 0]},{K[1, 1]},{K[0, 2]},{K[1, 2]}"
    loaded = LoadedModel.wrap(tiny_model())
    out = {}
    for backend in ("none", "slam"):
        cfg = PipelineConfig(outputs=OutputSettings(output_dir=str(tmp_path / backend)),
                             slam=SlamSettings(backend=backend, intrinsics=intr, refine=backend == "slam"))
        pipe = build_pipeline(cfg, loaded)
        res = [pipe.push(Frame(image=seq.rgb(i), seq=i, stamp=float(seq.stamps[i]), source="x")) for i in range(len(seq))]
        out[backend] = (pipe.close(), np.stack([r.T_wc for r in res]), pipe)
    s, T, pipe = out["slam"]
    lc = s.slam["loop_closure"]
    assert lc["closures"] >= 1 and lc["errors"] == 0 and lc["corrections_applied"] >= 1, lc
    assert s.map["rebuilds"] >= 1 and s.map["points"] > 0
    d = tmp_path / "slam"
    for name in ("trajectory.txt", "keyframes.txt", "trajectory_optimized.txt", "trajectory_refined.txt",
                 "map_refined.ply", "map.ply", "summary.json"):
        assert (d / name).is_file(), name
    _, T_ref = read_tum(d / "trajectory_refined.txt")
    _, T_opt = read_tum(d / "trajectory_optimized.txt")
    kf_stamps, _ = read_tum(d / "keyframes.txt")
    assert len(T_ref) == len(T_opt) == len(seq) and 3 <= len(kf_stamps) < len(seq)
    assert s.slam["refine"]["reprojection_px"][1] < s.slam["refine"]["reprojection_px"][0]
    e_none = ate(out["none"][1], seq.T_wc, True)["percent_of_path"]
    for name, traj in (("online", T), ("optimized", T_opt), ("refined", T_ref)):
        e = ate(traj, seq.T_wc, True)["percent_of_path"]
        assert e < 5.0 and 3 * e < e_none, (name, e, e_none)
    assert (tmp_path / "none" / "trajectory.txt").is_file() and not (tmp_path / "none" / "keyframes.txt").exists()


def test_refined_trajectory_does_not_correct_a_frame_twice():
    """A frame emitted after the stage applied a correction already carries it: its keyframe's online
    pose is brought into the frame's epoch first."""
    C = sim3(_rot([0, 0.3, 0]), [0.5, 0, 0], 1.2)
    kf = sim3(np.eye(3), [1.0, 0, 0])
    frame_before = sim3(np.eye(3), [1.1, 0, 0])  # epoch 0, like its keyframe
    frame_after = C @ sim3(np.eye(3), [1.2, 0, 0])  # emitted in epoch 1 (already corrected)
    R, t, s = sim3_parts(frame_after)
    frame_after = sim3(R, t, 1.0)
    poses = np.stack([kf, frame_before, frame_after])
    final_kf = C @ kf  # the pose graph agrees with the correction: nothing more should move
    out = refined_trajectory(poses, np.array([0]), poses[[0]], final_kf[None], np.array([0, 0, 1]), {1: C})
    np.testing.assert_allclose(out[2], poses[2], atol=1e-9)  # not corrected twice
    Rc, tc, sc = sim3_parts(C)
    np.testing.assert_allclose(out[1, :3, 3], sc * Rc @ poses[1, :3, 3] + tc, atol=1e-9)  # corrected once


def test_keyframe_cloud_budget_goes_to_points_the_map_keeps():
    """The bundled model keeps ~5 % of its points above the confidence threshold: the stored cloud
    (at most ``cloud_points``) must be drawn from those, or a map rebuilt from keyframes comes out
    nearly empty."""
    wall = _texture(7)
    kf = _keyframe(0, np.eye(4), np.eye(4), wall)
    rng = np.random.default_rng(0)
    n = 20_000
    cloud = np.c_[rng.uniform(-2, 2, (n, 2)), rng.uniform(3, 5, n)].astype(np.float32)
    conf = np.where(rng.random(n) < 0.05, 1.06, 1.0).astype(np.float32)
    cfg = MapConfig(voxel_size=0.001, conf_thresh=1.05)
    closer = LoopCloser(LoopConfig(cloud_points=2048), map_factory=lambda: GlobalMap(cfg), sync=True)
    closer.submit(KeyframeInput(**{**kf.__dict__, "cloud": cloud, "colors": np.zeros((n, 3), np.uint8), "conf": conf}))
    gmap = closer.rebuild_map(GlobalMap(cfg))
    assert len(gmap) == int((conf > 1.05).sum())  # every confident point, none of the others
