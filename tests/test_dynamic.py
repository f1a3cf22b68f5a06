"""Dynamic-object masks (--dynamic-mask): ground truth in the generator, the three cues, masks kept out
of the map and of tracking, the outputs, and the evaluation's mask figures."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from streamrecon.dynamic import DynamicMasker, DynamicOptions, mask_metrics, ratios, score_to_mask
from streamrecon.dynamic.attention import attention_score
from streamrecon.dynamic.flow import FlowScorer
from streamrecon.dynamic.masks import otsu_threshold
from streamrecon.dynamic.residual import residual_score
from streamrecon.engine import EngineConfig, StreamEngine
from streamrecon.frames import Frame
from streamrecon.mapping import GlobalMap, MapConfig
from streamrecon.pipeline.pipeline import StreamPipeline
from streamrecon.preprocess import plan_crop
from streamrecon.settings import MapSettings, SettingsError
from streamrecon.sinks.files import FileSink
from streamrecon.synth.dataset import SynthConfig, read_sequence, render_sequence, write_sequence

from .conftest import tiny_config


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth random texture (blurred noise) that optical flow can follow."""
    import cv2

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)


def _moving_square_frames(n: int = 4, h: int = 128, w: int = 160) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A background that shifts 2 px/frame to the left (a panning camera: a homography) and a textured
    square that moves 4 px/frame down; returns the frames and the square's true masks."""
    bg = _texture(h, w + 4 * n, 1)
    sq = _texture(32, 32, 2)
    frames, masks = [], []
    for i in range(n):
        img = bg[:, 2 * i:2 * i + w].copy()
        y, x = 20 + 4 * i, 60
        img[y:y + 32, x:x + 32] = sq
        m = np.zeros((h, w), bool)
        m[y:y + 32, x:x + 32] = True
        frames.append(img)
        masks.append(m)
    return frames, masks


# ---------------------------------------------------------------------------------------------- ground truth


def test_the_generator_marks_exactly_the_pixels_of_moving_objects(tmp_path):
    still = render_sequence(5, SynthConfig(height=48, width=64, frames=4, virtual=0, supersample=1))
    assert not still["dynamic"].any()  # no movers: nothing is dynamic
    cfg = SynthConfig(height=48, width=64, frames=6, virtual=0, supersample=1, moving=2, speed=(0.03, 0.04),
                      movers_in_view=True)
    seq = render_sequence(91_000_000, cfg)
    d = seq["dynamic"]
    assert d.shape == seq["depth"].shape and d.any() and not d.all()
    assert (seq["valid"] | ~d).all()  # a dynamic pixel is a valid hit
    # the masks follow the objects: they are not the same in every frame
    assert any(not np.array_equal(d[0], d[i]) for i in range(1, len(d)))
    out = write_sequence(seq, tmp_path / "seq")
    assert len(list((out / "dynamic").glob("*.png"))) == len(d)
    back = read_sequence(out)
    assert np.array_equal(back["dynamic"], d)
    assert read_sequence(write_sequence(still, tmp_path / "still"))["dynamic"] is None  # no masks written for it


def test_movers_in_view_moves_only_the_movers_into_the_view():
    from streamrecon.synth.dataset import _place_movers
    from streamrecon.synth.scene import random_scene
    from streamrecon.synth.trajectory import make_trajectory

    scene = random_scene(11, moving=2)
    before = [(o.center.clone(), o.velocity.clone()) for o in scene.objects]
    T = make_trajectory(scene, "walk", 20, seed=12, step=0.08)
    _place_movers(scene, T, 2, torch.Generator().manual_seed(13))
    for o, (c, v) in zip(scene.objects[2:], before[2:]):  # static objects stay where they were
        assert torch.equal(o.center, c) and torch.equal(o.velocity, v)
    moved = [not torch.equal(o.center, c) for o, (c, _) in zip(scene.objects[:2], before[:2])]
    assert any(moved)
    for o, (_, v) in zip(scene.objects[:2], before[:2]):
        assert float(o.velocity.norm()) == pytest.approx(float(v.norm()), rel=1e-5)  # same speed
        assert float(o.velocity[1]) == 0.0  # on the floor: horizontal motion


# ---------------------------------------------------------------------------------------------- masks and metrics


def test_mask_metrics_count_and_ratios():
    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    pred = np.zeros((4, 4), bool)
    pred[1:3] = True
    m = mask_metrics(pred, gt)
    assert (m["tp"], m["fp"], m["fn"]) == (4, 4, 4)
    assert m["iou"] == pytest.approx(4 / 12) and m["precision"] == 0.5 and m["recall"] == 0.5
    valid = np.ones_like(gt)
    valid[2] = False  # the false positives of row 2 are not judged
    assert mask_metrics(pred, gt, valid)["precision"] == 1.0
    assert np.isnan(ratios(0, 0, 0)["iou"]) and np.isnan(ratios(0, 0, 5)["precision"])


def test_score_to_mask_drops_specks_and_grows_blobs():
    s = np.zeros((20, 20), np.float32)
    s[3, 3] = 1.0  # an isolated pixel: opened away
    s[10:15, 10:15] = 0.9
    m = score_to_mask(s, 0.5, grow=1)
    assert not m[3, 3] and m[10:15, 10:15].all() and m[9, 12] and m[15, 12] and m.sum() == 49
    assert not score_to_mask(np.full((8, 8), 0.4, np.float32), 0.5).any()
    assert not score_to_mask(np.full((8, 8), np.nan, np.float32), 0.5).any()  # NaN is no evidence


def test_otsu_splits_two_populations():
    v = np.r_[np.full(100, 0.1), np.full(50, 0.8)]
    assert 0.1 < otsu_threshold(v) <= 0.8


# ---------------------------------------------------------------------------------------------- cues


def test_flow_finds_the_object_the_camera_motion_does_not_explain():
    frames, masks = _moving_square_frames(5)
    crop = plan_crop(*frames[0].shape[:2], 160)
    fs = FlowScorer(gap=1)
    assert fs.score(frames[0], crop) is None  # no earlier frame yet
    ious = []
    for img, gt in zip(frames[1:], masks[1:]):
        s = fs.score(img, crop)
        assert s is not None and s.shape == crop.output_hw and s.dtype == np.float32
        assert 0.0 <= s.min() and s.max() <= 1.0
        m = score_to_mask(s)
        ious.append(mask_metrics(m, gt)["iou"])
        assert s[gt].mean() > 3 * s[~gt].mean()
    assert min(ious) > 0.5, ious


def test_flow_on_a_static_scene_masks_almost_nothing():
    frames, _ = _moving_square_frames(4)
    bg = _texture(128, 200, 3)
    crop = plan_crop(128, 160, 160)
    fs = FlowScorer(gap=1)
    fs.score(bg[:, :160], crop)
    s = fs.score(bg[:, 3:163], crop)  # the camera pans 3 px; nothing moves
    assert score_to_mask(s).mean() < 0.02


def test_residual_scores_what_stands_in_front_of_the_map():
    h, w = 24, 32
    K = np.array([[30.0, 0, w / 2], [0, 30.0, h / 2], [0, 0, 1]])
    v, u = np.mgrid[0:h, 0:w]
    wall = np.stack([(u - w / 2) / 30 * 2.0, (v - h / 2) / 30 * 2.0, np.full(u.shape, 2.0)], -1).reshape(-1, 3)
    rgb = np.full((len(wall), 3), 128, np.uint8)
    depth = np.full((h, w), 2.0, np.float32)
    depth[8:16, 10:20] = 1.0  # something new half way to the wall
    depth[0:4, 0:4] = 3.0  # behind the wall: not a mover in this frame
    s = residual_score(wall.astype(np.float32), rgb, depth, np.eye(4), K, voxel_size=0.2)
    assert s[8:16, 10:20].min() > 0.9
    assert s[0:4, 0:4].max() == 0.0
    assert np.median(s) == 0.0
    assert residual_score(np.zeros((0, 3), np.float32), rgb[:0], depth, np.eye(4), K, 0.02) is None


def test_attention_score_marks_the_token_the_state_ignores():
    grid = (4, 5)
    n = grid[0] * grid[1]
    rng = np.random.default_rng(0)
    reads = 1.0 + 0.01 * rng.standard_normal((3, n))
    reads[:, 7] = 0.2  # the state barely reads token 7
    std = 0.1 + 0.001 * rng.standard_normal((3, n))
    std[:, 7] = 0.3
    s = attention_score({"state_logit": reads, "state_logit_std": std}, grid, (64, 80))
    assert s.shape == (64, 80)
    r, c = divmod(7, grid[1])
    assert s[r * 16 + 8, c * 16 + 8] > 0.9 and np.median(s) < 0.05
    assert attention_score(None, grid, (64, 80)) is None


def test_token_attention_leaves_the_outputs_unchanged(tiny_model):
    from streamrecon.types import FrameInput

    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    st = tiny_model.init_state(2)
    with torch.inference_mode():
        a, sa = tiny_model.step(FrameInput(img=x), st)
        b, sb = tiny_model.step(FrameInput(img=x), st, token_attention=True)
    assert a.token_attention is None
    for name in ("points_cam", "conf_cam", "points_world", "conf_world", "pose"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(sa.tokens, sb.tokens) and torch.equal(sa.mem, sb.mem)
    n = (64 // 16) ** 2
    assert set(b.token_attention) == {"state_logit", "state_logit_std", "state_reads", "reads_state_entropy",
                                      "self_received", "pose_reads"}
    for v in b.token_attention.values():
        assert v.shape == (2, tiny_model.cfg.dec_depth, n) and torch.isfinite(v).all()
    # the state's attention is a distribution over the image tokens and the pose token
    assert (b.token_attention["state_reads"].sum(-1) <= 1.0 + 1e-5).all()
    one = b.select(1)
    assert one.token_attention["state_reads"].shape == (1, tiny_model.cfg.dec_depth, n)


def test_engine_gives_no_attention_score_on_a_fresh_state(tiny_model):
    engine = StreamEngine(tiny_model, EngineConfig(size=64, token_attention=True))
    rng = np.random.default_rng(0)
    r0 = engine.process(Frame(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), seq=0, stamp=0.0))
    r1 = engine.process(Frame(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), seq=1, stamp=0.1))
    assert r0.dynamic is None
    assert r1.dynamic is not None and r1.dynamic.shape == r1.depth.shape
    plain = StreamEngine(tiny_model, EngineConfig(size=64))
    p0 = plain.process(Frame(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), seq=0, stamp=0.0))
    assert p0.dynamic is None


# ---------------------------------------------------------------------------------------------- the pipeline


def _left_half(masker: DynamicMasker, r):
    """``r`` scored 1 on the left half of the frame, 0 elsewhere (counted by ``masker``)."""
    s = np.zeros(r.depth.shape, np.float32)
    s[:, : s.shape[1] // 2] = 1.0
    return masker._with(r, s, time.perf_counter())


class _MaskLeftHalf(DynamicMasker):
    """A masker whose mask is the left half of every frame (what the map and the outputs do with it)."""

    def __init__(self) -> None:
        super().__init__(DynamicOptions("flow"))

    def before_stage(self, r, frame):
        return _left_half(self, r)


def test_masked_pixels_stay_out_of_the_map_but_are_returned(tmp_path):
    from streamrecon.models import Cut3r
    from streamrecon.sinks.base import BackgroundSink

    torch.manual_seed(0)
    model = Cut3r(tiny_config()).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]

    def run(masker, out):
        gmap = GlobalMap(MapConfig(conf_thresh=0.0, pixel_stride=1, voxel_size=1e-4))
        pipe = StreamPipeline(StreamEngine(model, EngineConfig(size=64)), gmap,
                              [BackgroundSink(FileSink(out, save_frames=True))], masker=masker)
        results = [pipe.push(Frame(image=im, seq=i, stamp=0.1 * i)) for i, im in enumerate(images)]
        return pipe, results, pipe.close()

    plain, plain_results, _ = run(None, tmp_path / "plain")
    masked, results, summary = run(_MaskLeftHalf(), tmp_path / "masked")
    for r in results:  # still returned: the whole pointmap, with the mask beside it
        assert r.dynamic_mask is not None and r.dynamic_mask[:, :31].all() and not r.dynamic_mask[:, 40:].any()
        assert np.isfinite(r.points_world_pose[:, :10]).all()
    # the map is exactly the map of the kept pixels: integrate them alone and compare
    ref = GlobalMap(MapConfig(conf_thresh=0.0, pixel_stride=1, voxel_size=1e-4))
    for r in results:
        keep = ~r.dynamic_mask
        ref.integrate(r.points_world_pose[keep], r.colors[keep], r.conf_cam[keep], r.index)
    got, want = masked.gmap.points(), ref.points()
    assert len(got[0]) == len(want[0]) > 0
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert np.isneginf(results[0].world_points("pose", static_only=True)[1][results[0].dynamic_mask]).all()
    assert np.array_equal(results[0].world_points("pose")[1], results[0].conf_cam)  # unchanged unless asked
    assert len(masked.gmap) < len(plain.gmap)
    assert summary.map["dynamic_mask"]["method"] == "flow" and summary.map["dynamic_mask"]["scored"] == 3
    assert summary.map["dynamic_mask"]["masked_fraction"] > 0.4
    z = np.load(tmp_path / "masked" / "frames" / "000001.npz")
    assert z["dynamic"].dtype == np.float16 and z["dynamic_mask"].dtype == bool
    assert np.array_equal(z["dynamic_mask"], results[1].dynamic_mask)
    assert "dynamic" not in np.load(tmp_path / "plain" / "frames" / "000001.npz").files


class _ResidualLeftHalf(DynamicMasker):
    """A residual-kind masker (run by the stage, after the pose) whose mask is the left half."""

    def __init__(self) -> None:
        super().__init__(DynamicOptions("residual"))

    def after_stage(self, r, gmap):
        return _left_half(self, r)


def test_keyframe_clouds_of_the_slam_backend_leave_out_masked_pixels():
    from streamrecon.models import Cut3r
    from streamrecon.pipeline import build_pipeline
    from streamrecon.pipeline.resolve import LoadedModel
    from streamrecon.settings import PipelineConfig, SlamSettings

    torch.manual_seed(0)
    model = Cut3r(tiny_config()).eval()
    seq = render_sequence(3, SynthConfig(height=96, width=128, frames=4, virtual=0, supersample=1))
    K = seq["K"]
    cfg = PipelineConfig(map=MapSettings(dynamic_mask="residual", conf_thresh=0.0),
                         slam=SlamSettings(backend="slam", intrinsics=f"{K[0, 0]},{K[1, 1]},{K[0, 2]},{K[1, 2]}",
                                           deterministic=True))
    pipe = build_pipeline(cfg, LoadedModel.wrap(model), files=False)
    pipe.masker = _ResidualLeftHalf()
    sent = []
    pipe.stage.loop.submit = sent.append
    results = [pipe.push(Frame(image=seq["rgb"][i], seq=i, stamp=0.1 * i)) for i in range(4)]
    pipe.close()
    assert sent, "no keyframe was submitted"
    st = pipe.stage._cloud_stride
    for kf in sent:
        r = next(r for r in results if r.index == kf.kid)
        assert np.isneginf(kf.conf).sum() == r.dynamic_mask[::st, ::st].sum() > 0
    assert pipe.masker.scored == 4  # once per frame: by the stage, not again by the pipeline


def test_published_geometry_carries_the_mask():
    from streamrecon import wire
    from streamrecon.sinks.base import FrameEvent
    from streamrecon.sinks.zmq_results import ResultPublisher

    torch.manual_seed(0)
    from streamrecon.models import Cut3r

    engine = StreamEngine(Cut3r(tiny_config()).eval(), EngineConfig(size=64))
    r = engine.process(Frame(image=np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8), seq=0, stamp=0.0))
    mask = np.zeros(r.depth.shape, bool)
    mask[:, :32] = True
    sent = []
    pub = ResultPublisher(sent.append, "cam", geometry_stride=2)
    for res in (r, dataclasses.replace(r, dynamic=mask.astype(np.float32), dynamic_mask=mask)):
        pub.on_frame(FrameEvent(stream_id="cam", result=res, new_points=np.zeros((0, 3)), new_colors=np.zeros((0, 3)),
                                map_points=0))
    plain, masked = (wire.decode_result(m)[2] for m in sent if wire.decode_result(m)[0].endswith("geometry"))
    assert "dynamic_mask" not in plain
    assert np.array_equal(masked["dynamic_mask"], mask[::2, ::2].astype(np.uint8))
    assert np.isfinite(masked["conf"].astype(np.float32)).all()  # the points are still all there


def test_the_tracker_drops_tracks_on_moving_pixels():
    from streamrecon.slam.tracker import Tracker, TrackerConfig

    frames, _ = _moving_square_frames(3, 240, 320)
    K = np.array([[300.0, 0, 160], [0, 300.0, 120], [0, 0, 1]])
    tr = Tracker(TrackerConfig(local_ba=False))
    exclude = np.zeros((240, 320), bool)
    exclude[:, :160] = True

    def depth_at(px, T_wc=None):
        return np.full(len(px), 2.0)

    import cv2

    grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    tr.track(grey[0], K, depth_at, np.eye(4), exclude=exclude)
    assert len(tr.cur) and (tr.cur[:, 0] >= 155).all()  # no corner was detected in the excluded half
    moved = np.zeros_like(exclude)
    moved[:, 200:] = True  # now the right part moves: its tracks are dropped
    before = tr.dynamic_dropped
    tr.track(grey[1], K, depth_at, np.eye(4), exclude=moved)
    assert tr.dynamic_dropped > before and (tr.cur[:, 0] < 201).all()
    tr.close()


def test_dynamic_settings_are_checked():
    MapSettings(dynamic_mask="flow", dynamic_thresh=0.3).validate()
    for bad in (0.0, 1.0, -1, float("nan")):
        with pytest.raises(SettingsError, match="--dynamic-thresh"):
            MapSettings(dynamic_thresh=bad).validate()
    with pytest.raises(ValueError, match="dynamic mask method"):
        DynamicOptions("optical")
    with pytest.raises(SettingsError, match="--dynamic-mask must be"):
        MapSettings(dynamic_mask="flo").validate()  # YAML bypasses the flag's choices
    import yaml

    assert MapSettings(dynamic_mask=yaml.safe_load("off")).dynamic_mask == "off"  # YAML's bare off is False


def test_batched_streams_get_the_same_attention_scores_as_one_by_one(tiny_model):
    from streamrecon.engine import process_batch

    rng = np.random.default_rng(0)
    frames = [[Frame(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), seq=i, stamp=0.1 * i) for i in range(3)]
              for _ in range(2)]
    cfg = EngineConfig(size=64, token_attention=True)
    together = [StreamEngine(tiny_model, cfg) for _ in range(2)]
    alone = [StreamEngine(tiny_model, cfg) for _ in range(2)]
    for i in range(3):
        batched = process_batch(together, [frames[0][i], frames[1][i]])
        for k in range(2):
            single = alone[k].process(frames[k][i])
            if i == 0:
                assert batched[k].dynamic is None and single.dynamic is None
            else:
                np.testing.assert_allclose(batched[k].dynamic, single.dynamic, atol=1e-4)


def test_run_with_dynamic_masks_from_the_command_line(tmp_path, shared):
    from streamrecon.cli import main

    out = tmp_path / "out"
    video = shared / "data" / "cut3r_examples" / "lady-running.mp4"
    rc = main(["run", str(video), "--max-frames", "6", "--output-dir", str(out), "--save-frames",
               "--dynamic-mask", "flow"])
    assert rc == 0
    import json

    s = json.loads((out / "summary.json").read_text())
    assert s["map"]["dynamic_mask"]["method"] == "flow" and s["map"]["dynamic_mask"]["scored"] >= 3
    z = np.load(out / "frames" / "000005.npz")
    assert z["dynamic_mask"].shape == z["depth"].shape and z["dynamic_mask"].any()  # a runner moves in it


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluation_scores_masks_and_the_static_map():
    from dataclasses import replace

    from streamrecon.eval.datasets import EvalSequence
    from streamrecon.eval.evaluate import EvalConfig, score_results

    cfg = SynthConfig(height=48, width=64, frames=5, virtual=0, supersample=1, moving=2, speed=(0.03, 0.04),
                      movers_in_view=True)
    seq = render_sequence(91_000_000, cfg)
    ev = EvalSequence.from_arrays("s", seq["rgb"], np.where(seq["valid"], seq["depth"], 0), seq["T_wc"], seq["K"])
    ev = replace(ev, dynamic_loader=lambda i: seq["dynamic"][i])
    crop = plan_crop(48, 64, 64)
    assert crop.output_hw == (48, 64)
    from streamrecon.frames import FrameResult

    def result(i, mask):
        d = np.where(seq["valid"][i], seq["depth"][i], 1.0).astype(np.float32)
        v, u = np.mgrid[0:48, 0:64]
        Kinv = np.linalg.inv(seq["K"])
        cam = (np.stack([u, v, np.ones_like(u)], -1) @ Kinv.T * d[..., None]).astype(np.float32)
        T = seq["T_wc"][i]
        world = (cam @ T[:3, :3].T + T[:3, 3]).astype(np.float32)
        return FrameResult(seq=i, stamp=float(i), source="s", index=i, segment=0, T_wc=T, points_cam=cam,
                           points_world_pose=world, points_world_head=world, conf_cam=np.full((48, 64), 3, np.float32),
                           conf_world=np.full((48, 64), 3, np.float32), depth=d, K=seq["K"], K_original=seq["K"],
                           colors=seq["rgb"][i], crop=crop, dynamic_mask=mask)

    idx = list(range(5))
    perfect = score_results(ev, idx, [result(i, seq["dynamic"][i]) for i in idx], EvalConfig(conf_thresh=1.0))
    none = score_results(ev, idx, [result(i, None) for i in idx], EvalConfig(conf_thresh=1.0))
    assert perfect["mask_iou"] == pytest.approx(1.0) and perfect["map_dynamic_fraction"] == 0.0
    assert none["mask_iou"] == 0.0 and none["mask_recall"] == 0.0 and none["map_dynamic_fraction"] > 0.0
    # the static map: the perfect masks leave only static points, all on the ground truth
    assert perfect["accuracy"] < 1e-3 and perfect["accuracy"] <= none["accuracy"]


def test_eval_backend_modifiers_are_parsed():
    from streamrecon.eval.real import _parse_label

    assert _parse_label("track+dynamic-mask=flow") == ("track", {"dynamic-mask": "flow"})
    assert _parse_label("none+revisit") == ("none", {"revisit": ""})
    for bad in ("none+mask=flow", "none+dynamic-mask", "none+revisit=1", "none+dynamic-mask=optical"):
        with pytest.raises(ValueError, match="modifier|dynamic mask"):
            _parse_label(bad)
