"""``--network-every``: the network on a worker thread for some frames, tracking on every frame; and
``--precision int8``."""

from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest
import torch

from streamrecon.engine import EngineConfig, Frame, StreamEngine
from streamrecon.eval.metrics import ate
from streamrecon.pipeline import LoadedModel, build_pipeline
from streamrecon.pipeline.network_worker import NetworkWorker
from streamrecon.settings import EngineSettings, MapSettings, OutputSettings, PipelineConfig, SettingsError, SlamSettings
from streamrecon.sinks.base import FrameEvent, StreamClosed
from streamrecon.slam.prior import DepthPrior

from .conftest import tiny_config

SUN3D_K = "570.342,570.342,320,240"


def _tiny():
    from streamrecon.models import Cut3r

    torch.manual_seed(0)
    return Cut3r(tiny_config()).eval()


class _SlowEngine:
    """Stands in for a StreamEngine: ``process`` takes ``delay`` seconds, fails on seq 13."""

    def __init__(self, delay: float) -> None:
        self.delay, self.seen = delay, []
        self.gate = threading.Event()
        self.gate.set()

    def process(self, frame):
        self.gate.wait()
        time.sleep(self.delay)
        if frame.seq == 13:
            raise ValueError("bad frame 13")
        self.seen.append(frame.seq)
        return frame.seq * 10


def _f(i):
    return Frame(image=np.zeros((4, 4, 3), np.uint8), seq=i, stamp=i / 30)


# ---------------------------------------------------------------------------------------------- worker

def test_worker_keeps_order_reports_errors_and_a_live_source_never_waits():
    eng = _SlowEngine(0.0)
    w = NetworkWorker(eng, depth=1)
    for i in (0, 13, 2):
        assert w.submit(i, _f(i), block=True)
    assert w.wait(10)
    done = w.poll()
    assert [d.index for d in done] == [0, 13, 2] and eng.seen == [0, 2]
    assert done[0].result == 0 and done[2].result == 20
    assert isinstance(done[1].error, ValueError) and done[1].result is None
    assert w.poll() == []
    # live: the network is busy with one frame, one waits; the next finds the queue full and is skipped
    eng.gate.clear()
    assert w.submit(5, _f(5), block=False)
    time.sleep(0.05)  # the worker took frame 5 and waits at the gate
    assert w.submit(6, _f(6), block=False)
    assert not w.submit(7, _f(7), block=False)
    assert w.skipped_busy == 1 and w.pending == 2
    eng.gate.set()
    assert w.wait(10) and [d.index for d in w.poll()] == [5, 6]
    st = w.stats(frames=8, wall_s=1.0)
    assert st["frames"] == 4 and st["failed"] == 1 and st["skipped_busy"] == 1 and st["submitted"] == 5
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.submit(8, _f(8), block=True)


def test_close_out_of_time_drops_the_waiting_frames_and_returns():
    eng = _SlowEngine(0.0)
    eng.gate.clear()  # the first frame's step hangs
    w = NetworkWorker(eng, depth=1)
    assert w.submit(0, _f(0), block=False)
    time.sleep(0.05)
    assert w.submit(1, _f(1), block=False)  # waits behind it
    t = time.monotonic()
    w.close(timeout=0.2)
    assert time.monotonic() - t < 5  # not twice the timeout per waiting frame
    assert w.dropped_at_close == 1 and w.stats(2, 1.0)["dropped_at_close"] == 1
    eng.gate.set()


def test_inline_worker_runs_in_the_calling_thread():
    eng = _SlowEngine(0.0)
    w = NetworkWorker(eng, inline=True)
    assert w.submit(3, _f(3), block=False)
    assert eng.seen == [3] and [d.result for d in w.poll()] == [30]
    w.close()


# ---------------------------------------------------------------------------------------------- prior

def test_depth_prior_moves_the_network_depth_to_another_pose():
    h, w = 32, 40
    K = np.array([[40.0, 0, 20], [0, 40.0, 16], [0, 0, 1]])
    depth = np.full((h, w), 2.0, np.float32)
    p = DepthPrior(depth, K, np.eye(4), scale=1.0, index=0)
    same = p.render(np.eye(4), 1.0, K, (h, w))
    assert np.nanmax(np.abs(same - 2.0)) < 1e-5 and np.isfinite(same[2:-2, 2:-2]).all()
    fwd = np.eye(4)
    fwd[2, 3] = 0.5  # the camera moved 0.5 forward: the wall is 1.5 away, seen larger (no holes in the middle)
    closer = p.render(fwd, 1.0, K, (h, w))
    assert np.nanmedian(closer) == pytest.approx(1.5, abs=1e-4) and np.isfinite(closer[8:-8, 8:-8]).all()
    # the tracker's units: the prior was made at scale 2 (world = 2 x network); now the scale is 4
    p2 = DepthPrior(depth, K, np.eye(4), scale=2.0, index=0)
    assert np.nanmedian(p2.render(np.eye(4), 4.0, K, (h, w))) == pytest.approx(1.0, abs=1e-5)
    back = np.eye(4)
    back[:3, :3] = np.diag([-1.0, 1.0, -1.0])  # turned around: nothing in view
    assert np.isnan(p.render(back, 1.0, K, (h, w))).all()
    # a loop-closure correction moves the prior with the world
    p.correct(lambda T: (T @ np.diag([1.0, 1, 1, 1]), 3.0))
    assert p.scale == 3.0


# ---------------------------------------------------------------------------------------------- pipeline

def _sun3d(shared, n):
    d = shared / "data" / "sun3d_studyroom" / "fragment-2-rgbd-frames"
    colours = sorted(d.glob("frame-*.color.png"))[:n]
    gt = np.stack([np.loadtxt(str(c).replace(".color.png", ".pose.txt")) for c in colours])
    return [cv2.cvtColor(cv2.imread(str(c)), cv2.COLOR_BGR2RGB) for c in colours], gt


class _Collect:
    name = "collect"

    def __init__(self):
        self.events, self.final = [], None

    def on_frame(self, e: FrameEvent):
        self.events.append(e)

    def on_probe(self, p):
        pass

    def close(self, final: StreamClosed):
        self.final = final


def test_network_every_3_tracks_every_frame_and_maps_the_network_frames(shared):
    """SUN3D fragment 2, 25 frames, known intrinsics: with the network on every 3rd frame (inline:
    deterministic) every frame still gets a tracked pose as good as with the network on every frame;
    the network's frames reach the map and the sinks with their own index and the tracked pose."""
    images, gt = _sun3d(shared, 25)
    model = LoadedModel.wrap(_tiny())
    poses, out = {}, {}
    for every in ("1", "3"):
        cfg = PipelineConfig(engine=EngineSettings(network_every=every),
                             slam=SlamSettings(backend="track", intrinsics=SUN3D_K, deterministic=True))
        cfg.validate()
        sink = _Collect()
        pipe = build_pipeline(cfg, model, files=False, extra_sinks=[sink])
        res = [pipe.push(Frame(image=im, seq=i, stamp=i / 30)) for i, im in enumerate(images)]
        s = pipe.close()
        poses[every] = np.stack([r.T_wc for r in res])
        out[every] = (res, sink, s, pipe)
    res, sink, s, pipe = out["3"]
    assert [r.index for r in res] == list(range(25)) and np.isfinite(poses["3"]).all()
    assert res[0].network and not any(r.network for r in res[1:])  # the first waits for the network
    assert all(r.tracking is not None for r in res) and res[1].points_cam.shape == (0, 0, 3)
    dense = [d for e in sink.events for d in e.dense_results()] + list(sink.final.dense)
    got = [d.index for d in dense]
    kfs = [r.index for r in res if r.tracking.keyframe]
    # each once, in order; at most 3 frames apart; keyframes always (their pixels go to the loop closer)
    assert got == sorted(set(got)) and got[0] == 0 and np.diff(got).max() <= 3 and set(kfs) <= set(got)
    assert len(got) >= 9 and len(got) < 25
    for d in dense:  # each at its own frame's tracked pose
        assert d.network and d.points_cam.shape[:2] == d.depth.shape and np.allclose(d.T_wc, res[d.index].T_wc)
        assert np.allclose(d.points_world_pose, d.points_cam @ d.T_wc[:3, :3].T.astype(np.float32)
                           + d.T_wc[:3, 3].astype(np.float32), atol=1e-4)
    assert s.network["frames"] == len(got) and s.network["every"] == 3 and s.network["poses_per_s"] > 0
    assert s.to_dict()["network"]["frames"] == len(got) and json.dumps(s.to_dict())
    assert len(pipe.gmap) > 0 and len(pipe.trajectory) == 25
    assert out["1"][2].network == {}  # every frame through the network: no network section
    e1 = ate(poses["1"], gt, True)["percent_of_path"]
    e3 = ate(poses["3"], gt, True)["percent_of_path"]
    e_id = ate(np.tile(np.eye(4), (25, 1, 1)), gt, True)["percent_of_path"]
    assert e3 < 6.0 and e3 < 1.5 * e1 + 0.5 and e3 * 3 < e_id, (e1, e3, e_id)


def test_network_every_auto_runs_the_network_on_keyframes(shared):
    images, _ = _sun3d(shared, 25)
    cfg = PipelineConfig(engine=EngineSettings(network_every="auto"),
                         slam=SlamSettings(backend="track", intrinsics=SUN3D_K, deterministic=True))
    sink = _Collect()
    pipe = build_pipeline(cfg, LoadedModel.wrap(_tiny()), files=False, extra_sinks=[sink])
    res = [pipe.push(Frame(image=im, seq=i, stamp=i / 30)) for i, im in enumerate(images)]
    s = pipe.close()
    got = [d.index for e in sink.events for d in e.dense_results()] + [d.index for d in sink.final.dense]
    kfs = [r.index for r in res if r.tracking.keyframe]
    assert set(kfs) <= set(got) and got[0] == 0  # every keyframe went to the network
    gaps = np.diff(got)
    assert gaps.max() <= 10 and len(got) < 25  # ... and at least every 10th frame, not every frame
    assert s.network["frames"] == len(got)


def test_a_bad_frame_with_network_every_is_counted_and_the_stream_goes_on(shared):
    images, _ = _sun3d(shared, 8)
    cfg = PipelineConfig(engine=EngineSettings(network_every="2"),
                         slam=SlamSettings(backend="track", intrinsics=SUN3D_K, deterministic=True))
    sink = _Collect()
    pipe = build_pipeline(cfg, LoadedModel.wrap(_tiny()), files=False, extra_sinks=[sink])
    ok = 0
    pending = None
    for i, im in enumerate(images):
        if i >= 2 and pending is None and pipe._records:  # a network result is waiting to be taken
            pending = set(pipe._records)
            with pytest.raises(ValueError, match="uint8"):
                pipe.push(Frame(image=im.astype(np.float32), seq=i, stamp=i / 30))
            with pytest.raises(ValueError, match="differs"):  # another size than the stream's
                pipe.push(Frame(image=cv2.resize(im, (600, 450)), seq=i, stamp=i / 30))
        pipe.push(Frame(image=im, seq=i, stamp=i / 30))
        ok += 1
    s = pipe.close()
    assert s.processed == ok == 8 and s.errors == 2 and len(pipe.gmap) > 0
    # a network result had arrived when the resized frame failed to track: it is not lost
    got = [d.index for e in sink.events for d in e.dense_results()] + [d.index for d in sink.final.dense]
    assert pending and pending <= set(got) and got == sorted(set(got))


def test_a_network_that_always_fails_ends_the_stream(shared):
    """Tracking must not go on forever on a stale prior: after NETWORK_FAILURES_FATAL failed network
    frames every frame fails (and the runner stops the run)."""
    from streamrecon.pipeline.pipeline import NETWORK_FAILURES_FATAL

    images, _ = _sun3d(shared, 8)
    cycle = images + images[-2:0:-1]  # forth and back: the tracker keeps its footing
    cfg = PipelineConfig(engine=EngineSettings(network_every="2"),
                         slam=SlamSettings(backend="track", intrinsics=SUN3D_K, deterministic=True))
    pipe = build_pipeline(cfg, LoadedModel.wrap(_tiny()), files=False)
    pipe.push(Frame(image=images[0], seq=0, stamp=0.0))

    def broken(frame):
        raise RuntimeError("CUDA out of memory (simulated)")

    pipe.network.engine.process = broken
    raised_at = None
    for i in range(1, 4 * NETWORK_FAILURES_FATAL):
        try:
            pipe.push(Frame(image=cycle[i % len(cycle)], seq=i, stamp=i / 30))
        except RuntimeError as e:
            assert "network failed on the last" in str(e)
            raised_at = i
            break
    assert raised_at is not None and raised_at <= 2 * NETWORK_FAILURES_FATAL + 2
    assert pipe.n_errors >= NETWORK_FAILURES_FATAL and "out of memory" in " ".join(pipe.errors)
    pipe.close()


def test_loop_corrections_reach_the_tracker_during_the_stream(shared):
    """With --backend slam the loop closer's results are taken at every frame, not at close."""
    images, _ = _sun3d(shared, 12)
    cfg = PipelineConfig(engine=EngineSettings(network_every="3"),
                         slam=SlamSettings(backend="slam", intrinsics=SUN3D_K, deterministic=True))
    pipe = build_pipeline(cfg, LoadedModel.wrap(_tiny()), files=False)
    polled = []
    real_poll = pipe.stage.poll
    pipe.stage.poll = lambda: (polled.append(pipe._next_index), real_poll())[1]
    for i, im in enumerate(images):
        pipe.push(Frame(image=im, seq=i, stamp=i / 30))
    pipe.close()
    assert polled[:len(images)] == list(range(len(images)))  # once before each frame is tracked (then at close)


def test_network_every_settings_errors():
    with pytest.raises(SettingsError, match="tracking backend"):
        PipelineConfig(engine=EngineSettings(network_every="3")).validate()
    for bad in ("0", "x", "-2", "1.5"):
        with pytest.raises(SettingsError, match="--network-every"):
            EngineSettings(network_every=bad).validate()
    with pytest.raises(SettingsError, match="--dynamic-mask"):
        PipelineConfig(engine=EngineSettings(network_every="auto"), map=MapSettings(dynamic_mask="flow"),
                       slam=SlamSettings(backend="track")).validate()
    with pytest.raises(SettingsError, match="--snapshot-every"):
        PipelineConfig(engine=EngineSettings(network_every="2"), outputs=OutputSettings(snapshot_every="10"),
                       slam=SlamSettings(backend="track")).validate()
    from streamrecon.server.config import ServeConfig

    with pytest.raises(SettingsError, match="serve"):
        ServeConfig(pipeline=PipelineConfig(engine=EngineSettings(network_every="2"),
                                            slam=SlamSettings(backend="track"))).validate()
    from streamrecon.run_settings import RunConfig

    with pytest.raises(SettingsError, match="--resume"):
        RunConfig.of(source="clip.mp4", network_every="2", backend="track", revisit=True).validate()
    assert EngineSettings(network_every="auto").network_schedule() == "auto"
    assert EngineSettings(network_every=" 4 ").network_schedule() == 4


def test_run_cli_with_network_every_writes_every_pose_and_the_network_frames(shared, tmp_path):
    from streamrecon.cli import main

    out = tmp_path / "o"
    rrd = tmp_path / "v.rrd"
    rc = main(["run", str(shared / "data" / "cut3r_examples" / "lady-running.mp4"), "--weights",
               str(shared / "golden" / "tiny_dpt" / "checkpoint.pth"), "--backend", "track", "--network-every", "4",
               "--max-frames", "12", "--save-frames", "--save-rrd", str(rrd), "--output-dir", str(out),
               "--deterministic", "--no-progress"])
    assert rc == 0
    rows = [ln for ln in (out / "trajectory.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(rows) == 12
    saved = sorted(int(p.stem) for p in (out / "frames").glob("*.npz"))  # the network's frames
    assert saved[0] == 0 and np.diff(saved).max() <= 4 and len(saved) < 12
    k = saved[1]
    z = np.load(out / "frames" / f"{k:06d}.npz")
    Tk = np.array([float(v) for v in rows[k].split()[1:]])
    assert np.allclose(z["T_wc"][:3, 3], Tk[:3], atol=1e-5) and z["depth"].ndim == 2  # at its tracked pose
    s = json.loads((out / "summary.json").read_text())
    assert s["network"]["frames"] == len(saved) and s["processed"] == 12 and rrd.stat().st_size > 0


def test_zmq_results_publish_a_pose_per_frame_and_geometry_per_network_result():
    from streamrecon.sinks.zmq_results import ResultPublisher
    from streamrecon.wire import decode_result

    eng = StreamEngine(_tiny(), EngineConfig(size=64))
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    dense = eng.process(Frame(image=img, seq=0, stamp=0.0))
    pose = type(dense).pose_only(seq=1, stamp=1 / 30, source="", index=1, segment=0, T_wc=np.eye(4), K=dense.K,
                                 K_original=dense.K_original, crop=dense.crop)
    sent = []
    sink = ResultPublisher(sent.append, "s", geometry_stride=2)
    sink.on_frame(FrameEvent(stream_id="s", result=pose, new_points=np.zeros((0, 3)), new_colors=np.zeros((0, 3)),
                             map_points=0, dense=(dense,)))
    decoded = [decode_result(m) for m in sent]
    assert [h.get("kind") for _, h, _ in decoded] == ["pose", "geometry"]
    assert decoded[0][1]["seq"] == 1 and decoded[1][1]["seq"] == 0  # the network frame's own seq
    assert decoded[1][2]["points"].shape == (24, 32, 3)
    # network frames that arrive at close are published too
    sent.clear()
    sink.close(StreamClosed(stream_id="s", summary={}, map_xyz=np.zeros((0, 3), np.float32),
                            map_rgb=np.zeros((0, 3), np.uint8), map_conf=np.zeros(0, np.float32),
                            stamps=np.zeros(0), poses=np.zeros((0, 4, 4)), dense=(dense,)))
    assert [(decode_result(m)[1]["kind"], decode_result(m)[1]["seq"]) for m in sent] == [("geometry", 0)]


# ---------------------------------------------------------------------------------------------- int8

def test_int8_quantises_the_trunk_of_a_shared_copy_and_stays_close_to_fp32(shared):
    from streamrecon.engine.quant import INT8_MODULES, is_int8

    model = _tiny()
    e32 = StreamEngine(model, EngineConfig(size=64))
    e8 = StreamEngine(model, EngineConfig(size=64, precision="int8"))
    e8b = StreamEngine(model, EngineConfig(size=64, precision="int8"))
    assert e8.model is e8b.model and e8.model is not model  # one quantised copy, shared
    assert not is_int8(model) and all(type(m) is torch.nn.Linear for m in model.dec_blocks.modules()
                                      if "Linear" in type(m).__name__)  # the fp32 model is untouched
    lin = [type(m) for name in INT8_MODULES for m in getattr(e8.model, name).modules() if type(m).__name__ == "Linear"]
    assert lin and all(t.__module__.startswith("torch.ao.nn.quantized.dynamic") for t in lin)  # every trunk Linear
    heads = [type(m).__module__ for m in e8.model.downstream_head.modules()]
    assert not any("quantized" in n for n in heads)  # the heads stay fp32
    d = shared / "data" / "sun3d_studyroom" / "fragment-2-rgbd-frames"
    for i, c in enumerate(sorted(d.glob("frame-*.color.png"))[:3]):
        f = Frame(image=cv2.cvtColor(cv2.imread(str(c)), cv2.COLOR_BGR2RGB), seq=i, stamp=i / 30)
        a, b = e32.process(f), e8.process(f)
    err = float(np.abs(a.depth - b.depth).max() / np.abs(a.depth).max())
    assert 0 < err < 0.2, err  # not bit-exact (quantised), but the same prediction
    with pytest.raises(SettingsError, match="CPU only"):
        EngineSettings(precision="int8", device="cuda").validate()


def test_bench_sweeps_precisions_and_heads_in_one_run_with_drift_and_pose_rate(shared, tmp_path):
    from streamrecon.cli import main

    out = tmp_path / "sweep.json"
    rc = main(["bench", "--model", str(shared / "golden" / "tiny_dpt" / "checkpoint.pth"), "--images",
               str(shared / "data" / "cut3r_examples" / "lady-running.mp4"), "--size", "64", "--frames", "4",
               "--warmup", "1", "--precision", "fp32", "int8", "--heads", "full", "minimal", "--backend", "track",
               "--network-every", "2", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    rows = {(r["precision"], r["heads"]): r for r in rep["variants"]}
    assert list(rows) == [("fp32", "full"), ("fp32", "minimal"), ("int8", "full"), ("int8", "minimal")]
    assert rows["fp32", "full"]["speedup"] == 1.0 and "drift" not in rows["fp32", "full"]
    d = rows["fp32", "minimal"]["drift"]
    assert d["depth"] == 0 and d["pose_m"] == 0  # minimal heads: what is computed is identical
    q = rows["int8", "full"]["drift"]
    assert 0 < q["depth"] < 0.5 and q["pose_deg"] < 45
    # the whole tracked pipeline, deterministic: identical where the outputs are, finite for int8
    t = rows["fp32", "minimal"]["tracked_drift"]
    assert t["depth"] == 0 and t["pose_m"] == 0 and t["pose_deg"] == 0
    t = rows["int8", "full"]["tracked_drift"]
    assert all(np.isfinite(t[k]) for k in ("depth", "pose_m", "pose_deg")) and t["depth"] > 0
    assert "tracked_drift" not in rows["fp32", "full"]
    for r in rows.values():
        p = r["pipeline"]
        # every 2nd frame at the latest, and the tracker's keyframes (the first frames of a stream often are)
        assert p["frames"] == 4 and 2 <= p["network_frames"] <= 4 and p["poses_per_s"] >= p["network_per_s"] > 0
        assert r["ms_p50"] > 0 and r["network_fps"] > 0


def test_prefetch_asked_for_with_network_every_is_left_off_and_every_frame_is_processed(shared, tmp_path):
    """The network's worker prepares its own frames: a prefetched (already prepared) item used to fail
    every frame of the run."""
    from streamrecon.cli import main

    out = tmp_path / "o"
    rc = main(["run", str(shared / "data" / "cut3r_examples" / "lady-running.mp4"), "--weights",
               str(shared / "golden" / "tiny_dpt" / "checkpoint.pth"), "--backend", "track", "--network-every", "4",
               "--max-frames", "8", "--prefetch", "--output-dir", str(out), "--deterministic", "--no-progress"])
    s = json.loads((out / "summary.json").read_text())
    assert rc == 0 and s["processed"] == 8 and s["errors"] == 0 and s["prefetch"] is False


def test_local_ba_is_kept_out_of_the_whole_frame_and_let_in_while_the_loop_waits(shared):
    """The bundle-adjustment thread holds the GIL while gtsam iterates; with ``--network-every`` it
    must not start an iteration while the frame loop integrates the map (it used to: integration
    took 100+ ms instead of 4), only while the loop blocks on a busy network, and between frames."""
    images, _ = _sun3d(shared, 14)
    cfg = PipelineConfig(engine=EngineSettings(network_every="2"),
                         slam=SlamSettings(backend="track", intrinsics=SUN3D_K, ba_worker="thread"))
    pipe = build_pipeline(cfg, LoadedModel.wrap(_tiny()), files=False)
    tracker = pipe.stage.tracker
    assert not tracker.cfg.ba_process
    in_integrate, in_wait = [], []
    pushing = False
    integrate = pipe.gmap.integrate

    def watched_integrate(*a, **k):
        if pushing:  # (the drain at close integrates too, after the frame loop)
            in_integrate.append(tracker._idle.is_set())
        return integrate(*a, **k)

    pipe.gmap.integrate = watched_integrate

    class Slow:  # the network slower than tracking: the (lossless) frame loop waits for it
        def __init__(self, engine):
            self.engine = engine

        def process(self, frame):
            time.sleep(0.15)
            return self.engine.process(frame)

    pipe.network.engine = Slow(pipe.network.engine)
    submit = pipe.network.submit

    def watched_submit(index, frame, block):
        if block and pipe.network.full:
            in_wait.append(tracker._idle.is_set())
        return submit(index, frame, block)

    pipe.network.submit = watched_submit
    between = []
    for i, im in enumerate(images):
        pushing = True
        pipe.push(Frame(image=im, seq=i, stamp=i / 30))
        pushing = False
        between.append(tracker._idle.is_set())
    pipe.close()
    assert in_integrate and not any(in_integrate)  # never idle while the map takes a frame
    assert in_wait and all(in_wait)  # idle while the loop waits for a free network slot
    assert all(between)  # and between frames


def test_tracker_busy_spans_nest_and_waiting_opens_them():
    from streamrecon.slam.tracker import Tracker, TrackerConfig

    t = Tracker(TrackerConfig(local_ba=False))
    assert t._idle.is_set()
    with t.busy():
        with t.busy():
            assert not t._idle.is_set()
        assert not t._idle.is_set()  # the outer span still holds
        with t.waiting():
            assert t._idle.is_set()
        assert not t._idle.is_set()
        grey = np.zeros((48, 64), np.uint8)
        t.track(grey, np.eye(3), lambda px, T: np.full(len(px), np.nan), np.eye(4))  # a track inside the span
        assert not t._idle.is_set()  # ... does not open it
    assert t._idle.is_set()
    with t.waiting():  # outside any span: stays idle
        assert t._idle.is_set()
    assert t._idle.is_set()


def test_ba_worker_auto_is_a_child_process_beside_the_network_thread_and_a_thread_otherwise():
    s = SlamSettings(backend="track", intrinsics=SUN3D_K)
    assert s.resolved_ba_worker(network_async=True) == "process"
    assert s.resolved_ba_worker(network_async=False) == "thread"
    assert SlamSettings(backend="track", deterministic=True).resolved_ba_worker(network_async=True) == "thread"
    assert SlamSettings(ba_worker="thread").resolved_ba_worker(network_async=True) == "thread"
    assert SlamSettings(ba_worker="process").resolved_ba_worker(network_async=False) == "process"
    model = LoadedModel.wrap(_tiny())
    for every, worker, process in (("auto", "auto", True), ("1", "auto", False), ("auto", "thread", False),
                                   ("1", "process", True)):
        cfg = PipelineConfig(engine=EngineSettings(network_every=every),
                             slam=SlamSettings(backend="track", intrinsics=SUN3D_K, ba_worker=worker))
        pipe = build_pipeline(cfg, model, files=False)
        try:
            assert pipe.stage.tracker.cfg.ba_process is process, (every, worker)
        finally:
            pipe.close()


def test_the_bundle_adjustment_in_a_child_process_refines_the_stream(shared):
    """``--ba-worker process``: windows go to the child and their results come back into the tracker."""
    pytest.importorskip("gtsam")
    images, T_gt = _sun3d(shared, 30)
    cfg = PipelineConfig(engine=EngineSettings(network_every="auto"),
                         slam=SlamSettings(backend="track", intrinsics=SUN3D_K, ba_worker="process"))
    pipe = build_pipeline(cfg, LoadedModel.wrap(_tiny()), files=False)
    tracker = pipe.stage.tracker
    poses = []
    for i, im in enumerate(images):
        poses.append(pipe.push(Frame(image=im, seq=i, stamp=i / 30)))
        if i % 5 == 4 and tracker._ba_worker is not None:
            tracker._ba_worker.wait(20.0)  # let the child answer (a real stream does not wait)
    fn = type(tracker._ba_worker._fn).__name__
    s = pipe.close()
    assert fn == "ProcessBA"
    assert s.slam["local_ba"]["runs"] >= 2 and s.slam["local_ba"]["applied"] >= 1, s.slam["local_ba"]
    assert s.slam["local_ba"]["failed"] == 0
