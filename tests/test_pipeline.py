"""The shared pipeline: run and serve write the same files; sinks stay off the frame loop; settings,
intrinsics given with a frame, CLI error classes."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time

import numpy as np
import pytest

from streamrecon.cli import main as cli_main
from streamrecon.engine import EngineConfig, Frame, StreamEngine
from streamrecon.mapping import GlobalMap, MapConfig, read_tum
from streamrecon.pipeline import LoadedModel, StreamPipeline, Trajectory
from streamrecon.run_settings import RunConfig
from streamrecon.runner import run
from streamrecon.settings import PipelineConfig, SettingsError, parse_size
from streamrecon.sinks import BackgroundSink, FileSink, FrameEvent, NullSink, StreamClosed
from streamrecon.sources import open_source
from streamrecon_bridges.camera_pub import Publisher

from .node_helpers import Client, poses, running_node, tiny_model, wait_for

CLIP = "data/cut3r_examples/003"  # 4 portrait frames, 540x720


def test_run_and_serve_write_byte_identical_map_and_trajectory(tmp_path, shared):
    """The same frames and settings through `run` and through one `serve` stream give the same files."""
    settings = dict(size=64, voxel_size=0.01, pixel_stride=1, conf_thresh=1.0)
    out_run = tmp_path / "run"
    s = run(RunConfig.of(source=str(shared / CLIP), output_dir=str(out_run), progress=False, **settings),
            model=tiny_model())
    assert s["processed"] == 4 and s["map"]["points"] > 0
    frames = list(open_source(str(shared / CLIP)))
    with running_node(tmp_path / "serve", lossless=True, **settings) as node:
        pub = Publisher(node.endpoints["ingest"], "cam", lossless=True, window=1)
        for f in frames:
            assert pub.send(f.image, stamp_ns=int(round(f.stamp * 1e9)))
        pub.flush()
        pub.close()
        assert wait_for(lambda: "cam" in node.sessions and node.sessions["cam"].processed == 4)
        c = Client(node)
        reply, _ = c.request("close_stream", stream_id="cam")
        c.close()
        assert reply["ok"], reply
    out_serve = tmp_path / "serve" / "serve" / "streams" / "cam"
    for name in ("trajectory.txt", "map.ply", "map.glb"):
        a, b = (out_run / name).read_bytes(), (out_serve / name).read_bytes()
        assert a == b, f"{name} differs between run and serve"
    assert json.loads((out_serve / "summary.json").read_text())["processed"] == 4


class _Slow:
    """A sink that takes its time and records what it saw."""

    name = "files"

    def __init__(self, delay: float = 0.02) -> None:
        self.delay, self.frames, self.closed = delay, [], None
        self.release = threading.Event()

    def on_frame(self, event):
        self.release.wait(10)
        time.sleep(self.delay)
        self.frames.append(event.result.index)

    def on_probe(self, probe):
        pass

    def close(self, final):
        self.closed = final


class _Fails(_Slow):
    name = "viewer"

    def on_frame(self, event):
        raise OSError("disk full")


def _fake_event(i: int) -> FrameEvent:
    r = type("R", (), {"index": i})()
    return FrameEvent(stream_id="s", result=r, new_points=np.zeros((0, 3)), new_colors=np.zeros((0, 3)), map_points=0)


def _final() -> StreamClosed:
    z = np.zeros((0, 3))
    return StreamClosed("s", {}, z, z.astype(np.uint8), np.zeros(0), np.zeros(0), np.zeros((0, 4, 4)))


def test_background_files_never_drop_and_the_viewer_drops_when_full():
    files, viewer = _Slow(0.0), _Slow(0.0)
    bf, bv = BackgroundSink(files, maxsize=2, drop=False), BackgroundSink(viewer, maxsize=2, drop=True)
    # the workers are blocked: the viewer's queue fills and drops; the file sink's producer must wait
    for i in range(5):
        bv.on_frame(_fake_event(i))
    assert bv.stats.dropped >= 2
    producer = threading.Thread(target=lambda: [bf.on_frame(_fake_event(i)) for i in range(20)])
    producer.start()
    time.sleep(0.2)
    assert producer.is_alive(), "a full file queue must make the producer wait (backpressure), not drop"
    files.release.set()
    viewer.release.set()
    producer.join(10)
    bf.close(_final())
    bv.close(_final())
    assert files.frames == list(range(20)) and bf.stats.dropped == 0 and files.closed is not None
    assert viewer.frames == sorted(viewer.frames) and len(viewer.frames) + bv.stats.dropped == 5


def test_a_failing_sink_is_counted_and_the_others_go_on():
    bad, good = BackgroundSink(_Fails(), maxsize=4), _Slow(0.0)
    good.release.set()
    for i in range(3):
        bad.on_frame(_fake_event(i))
        good.on_frame(_fake_event(i))
    bad.close(_final())
    assert bad.stats.errors == 3 and "disk full" in bad.stats.last_error and good.frames == [0, 1, 2]


def test_pipeline_results_are_frozen_and_intrinsics_given_are_carried_through(tmp_path):
    model = tiny_model()
    files = FileSink(tmp_path, save_frames=True, flush_every=2)
    pipe = StreamPipeline(StreamEngine(model, EngineConfig(size=64)), GlobalMap(MapConfig(conf_thresh=1.0)),
                          [BackgroundSink(files), NullSink()])
    rng = np.random.default_rng(0)
    K = np.array([[500.0, 0, 320], [0, 505.0, 240], [0, 0, 1]])
    for i in range(3):
        r = pipe.push(Frame(image=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), seq=i, stamp=i * 0.1,
                            K=K if i != 1 else None))
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.T_wc = np.eye(4)
        assert set(r.timings_ms) == {"preprocess", "model", "postprocess"}  # the pipeline keeps its own
    with pytest.raises(ValueError, match="K must be"):
        pipe.push(Frame(image=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), seq=9, stamp=1.0, K=-K))
    summary = pipe.close()
    assert summary.processed == 3 and summary.errors == 1 and summary.frames_with_K_given == 2
    assert {"map", "sinks", "model"} <= set(summary.latency_ms)
    f0, f1 = np.load(tmp_path / "frames" / "000000.npz"), np.load(tmp_path / "frames" / "000001.npz")
    assert np.array_equal(f0["K_given"], K) and np.isnan(f1["K_given"]).all()
    stamps, T = read_tum(tmp_path / "trajectory.txt")
    assert np.allclose(stamps, [0, 0.1, 0.2]) and len(T) == 3


def test_trajectory_file_is_appended_never_rewritten(tmp_path):
    """Each flush adds lines to the same file (no rewrite: constant cost per frame)."""
    files = FileSink(tmp_path, flush_every=1)
    seen = []
    for i in range(5):
        T = np.eye(4)
        T[0, 3] = i
        r = type("R", (), {"stamp": float(i), "T_wc": T, "index": i})()
        files.on_frame(FrameEvent("s", r, np.zeros((0, 3)), np.zeros((0, 3)), 0))
        path = tmp_path / "trajectory.txt"
        seen.append((path.stat().st_ino, path.read_text()))
    assert len({ino for ino, _ in seen}) == 1
    for (_, before), (_, after) in zip(seen, seen[1:]):
        assert after.startswith(before) and after.count("\n") == before.count("\n") + 1


def test_chunked_trajectory_matches_a_list():
    tr = Trajectory(chunk=4)
    ref = []
    for i in range(11):
        T = np.eye(4)
        T[:3, 3] = i
        tr.append(i * 0.5, T)
        ref.append(T)
        stamps, poses_ = tr.arrays()
        assert len(tr) == i + 1 and np.array_equal(poses_, np.stack(ref)) and stamps[-1] == i * 0.5
    assert np.array_equal(tr.last(), ref[-1])


def test_serve_gets_the_run_outputs_per_stream(tmp_path):
    """--save-frames, --save-rrd (one recording, a subtree per stream), periodic flush, K_given on the wire."""
    from .test_rerun_sink import _rows

    rrd = tmp_path / "all.rrd"
    K = np.array([[40.0, 0, 32], [0, 40.0, 24], [0, 0, 1]])
    with running_node(tmp_path, lossless=True, save_frames=True, save_rrd=str(rrd), flush_every=2) as node:
        c = Client(node)
        time.sleep(0.3)
        for sid in ("a", "b"):
            pub = Publisher(node.endpoints["ingest"], sid, lossless=True, window=1)
            rng = np.random.default_rng(1)
            for i in range(3):
                assert pub.send(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), stamp_ns=i * 10**8, K=K)
            pub.flush()
            pub.close()
        got = c.collect(lambda g: len(poses(g)) >= 6)
        assert all(np.allclose(np.reshape(h["K_given"], (3, 3)), K) for h in poses(got))
        assert wait_for(lambda: (tmp_path / "serve" / "streams" / "a" / "summary.json").exists())
        running = json.loads((tmp_path / "serve" / "streams" / "a" / "summary.json").read_text())
        assert running["in_progress"] is True
        c.close()
    for sid in ("a", "b"):
        d = tmp_path / "serve" / "streams" / sid
        assert sorted(p.name for p in (d / "frames").iterdir()) == ["000000.npz", "000001.npz", "000002.npz"]
        assert np.array_equal(np.load(d / "frames" / "000002.npz")["K_given"], K)
        summary = json.loads((d / "summary.json").read_text())
        assert summary["in_progress"] is False and summary["frames_with_K_given"] == 3
    rows = _rows(rrd)
    assert rows["/streams/a/world/cam"]["Transform3D"] == 3 and rows["/streams/b/world/cam"]["Transform3D"] == 3


def test_serve_defaults_to_the_bundled_model_with_its_threshold(tmp_path):
    from streamrecon.server import Node, ServeConfig
    from streamrecon.weights import bundled_weights

    node = Node(ServeConfig.of(ingest="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                               output_dir=str(tmp_path)))
    try:
        assert node.loaded.info.bundled and node.loaded.info.path == str(bundled_weights())
        meta = json.loads(bundled_weights().with_suffix(".json").read_text())
        assert node.loaded.info.conf_thresh == float(meta["conf_thresh"]) != 1.5
        assert not hasattr(node.model, "checkpoint_meta")  # metadata travels in CheckpointInfo
    finally:
        node.close()


def test_one_settings_model_for_both_commands(caplog):
    from streamrecon.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    flags = {name: {o for a in sub[name]._actions for o in a.option_strings} for name in ("run", "serve")}
    shared = {"--weights", "--size", "--state-policy", "--precision", "--output-dir", "--viewer", "--save-rrd",
              "--save-frames", "--voxel-size", "--conf-thresh", "--flush-every", "--map-points", "--device"}
    assert shared <= flags["run"] and shared <= flags["serve"]
    for old in ("--out-dir", "--dtype", "--policy", "--rule"):  # deprecated, still accepted
        assert old in flags["run"] and old in flags["serve"]
    args = parser.parse_args(["run", "x", "--out-dir", "o", "--dtype", "bfloat16", "--policy", "ttt3r", "--size",
                              "384x512"])
    from streamrecon.cli.flags import settings_from_args
    from streamrecon.cli.run_cmd import load_run_config

    cfg = load_run_config(None, settings_from_args(args))
    p = cfg.pipeline
    assert (p.outputs.output_dir, p.engine.precision, p.engine.state_policy, p.engine.model_size()) == \
        ("o", "bf16", "ttt3r", 512)
    assert sum("deprecated" in r.getMessage() for r in caplog.records) == 3
    assert parse_size("224x224") == 224 and parse_size(96) == 96 and parse_size(None) is None
    with pytest.raises(SettingsError, match="--size"):
        parse_size("big")
    with pytest.raises(SettingsError, match="unknown setting"):
        RunConfig.of(source="x", voxels=3)
    assert PipelineConfig().outputs.output_dir == "outputs/run"


def test_bad_input_exits_2_and_our_bugs_exit_1(tmp_path, shared, capsys, monkeypatch):
    code = cli_main(["run", "x", "--size", "huge", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--size" in err and "Traceback" not in err
    code = cli_main(["run", str(shared / CLIP), "--weights", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder" in err
    assert cli_main(["info", str(tmp_path)]) == 2 and "is a folder" in capsys.readouterr().err

    # parity on folders that are not golden sets: one line each, never a traceback or an unpickle
    (tmp_path / "pickled").mkdir()
    np.savez(tmp_path / "pickled" / "vectors.npz", a=np.array([{"x": 1}], dtype=object))  # needs an unpickle
    (tmp_path / "partial").mkdir()
    np.savez(tmp_path / "partial" / "vectors.npz", a=np.zeros(3))
    shutil.copy(shared / "golden" / "tiny_dpt" / "checkpoint.pth", tmp_path / "partial")
    for folder, says in ((shared / CLIP, "not a golden set"), (tmp_path / "nope", "no such golden set folder"),
                         (tmp_path / "pickled", "not a readable golden array file"),
                         (tmp_path / "partial", "not a complete golden set"),
                         (shared / "golden" / "policies" / "ttt3r_tiny_dpt", "tests/test_policies.py")):
        code = cli_main(["parity", str(folder)])
        err = capsys.readouterr().err
        assert code == 2 and says in err and "Traceback" not in err and "internal error" not in err, (folder, err)

    import streamrecon.runner

    def broken(cfg, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(streamrecon.runner, "run", broken)
    code = cli_main(["run", "x", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "internal error" in err and "boom" in err and "Traceback" not in err
    code = cli_main(["-v", "run", "x", "--output-dir", str(tmp_path)])
    assert code == 1 and "Traceback" in capsys.readouterr().err


def test_loaded_model_wrap_keeps_info():
    from streamrecon.checkpoint import CheckpointInfo

    m = tiny_model()
    info = CheckpointInfo(path="x", format="pth", meta={"conf_thresh": "1.2"})
    assert LoadedModel.wrap(m).info.conf_thresh is None
    assert LoadedModel.wrap(LoadedModel(m, info)).info.conf_thresh == 1.2


def test_minimal_heads_give_the_same_map_and_trajectory(tmp_path):
    """--heads minimal: the map (T_wc x camera points) and the poses are those of --heads full; the head's
    world points are then the pose-based ones; --map-points head is refused with it."""
    from streamrecon.settings import EngineSettings, MapSettings, PipelineConfig, SettingsError

    model = tiny_model()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    runs = {}
    for heads in ("full", "minimal"):
        pipe = StreamPipeline(StreamEngine(model, EngineConfig(size=64, heads=heads)), GlobalMap(MapConfig(conf_thresh=1.0)))
        results = [pipe.push(Frame(image=im, seq=i, stamp=0.1 * i)) for i, im in enumerate(images)]
        pipe.close()
        runs[heads] = (results, pipe.gmap.points())
    (full, map_full), (mini, map_mini) = runs["full"], runs["minimal"]
    for a, b in zip(full, mini):
        assert np.array_equal(a.T_wc, b.T_wc) and np.array_equal(a.points_world_pose, b.points_world_pose)
        assert np.array_equal(b.points_world_head, b.points_world_pose) and np.array_equal(b.conf_world, b.conf_cam)
        assert not np.array_equal(a.points_world_head, a.points_world_pose)  # full: the head's own points
    assert all(np.array_equal(x, y) for x, y in zip(map_full, map_mini))
    with pytest.raises(SettingsError, match="--heads minimal"):
        PipelineConfig(engine=EngineSettings(heads="minimal"), map=MapSettings(map_points="head")).validate()
    with pytest.raises(SettingsError, match="--heads"):
        EngineSettings(heads="half").validate()
