"""The Rerun recording of a run, read back from the .rrd file."""

from __future__ import annotations

import numpy as np
import pytest
import rerun  # noqa: F401  (rerun-sdk is a hard dependency of the node: missing, it must fail, not skip)

from streamrecon.checkpoint import load_model
from streamrecon.engine import EngineConfig, Frame, StreamEngine
from streamrecon.mapping import GlobalMap, MapConfig
from streamrecon.probe import orbit_cameras


def _rows(path) -> dict[str, dict[str, int]]:
    """entity -> archetype (or 'static:<archetype>') -> number of rows, summed over chunks."""
    import re
    from collections import defaultdict

    from rerun.chunk import RrdReader

    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for line in str(RrdReader(path).store().summary()).splitlines():
        m = re.match(r"(\S+) rows=(\d+) static=(\w+) .*cols=\[(.*)\]", line)
        if not m or not m.group(4):
            continue
        archetype = m.group(4).split(":")[0].strip("'")
        key = ("static:" if m.group(3) == "True" else "") + archetype
        out[m.group(1)][key] += int(m.group(2))
    return out


def test_recording_holds_cameras_images_map_trajectory_metrics_and_probes(tmp_path, shared):
    from streamrecon.sinks.rerun_sink import RerunConfig, RerunSink

    model = load_model(shared / "golden" / "tiny_dpt" / "checkpoint.pth")
    engine = StreamEngine(model, EngineConfig(size=64))
    gmap = GlobalMap(MapConfig(voxel_size=0.05, conf_thresh=1.0, pixel_stride=1))
    path = tmp_path / "rec.rrd"
    sink = RerunSink(RerunConfig(save_path=str(path), consolidate_every=2))
    rng = np.random.default_rng(0)
    logged_new = 0
    for k in range(4):
        r = engine.process(Frame(image=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), seq=k, stamp=100 + k / 10))
        integ = gmap.integrate(r.points_world_pose, r.colors, r.conf_cam, r.index)
        logged_new += bool(len(integ.new_points))
        sink.log_frame(r, integ.new_points, integ.new_colors, {"fps": 5.0, "map_points": len(gmap)})
        if (k + 1) % 2 == 0:
            sink.log_map(k, *gmap.points()[:2])
    for cam in orbit_cameras(gmap.points()[0], engine.last_T_wc, 2):
        sink.log_probe(engine.probe(cam.T_wc, name=cam.name))
    sink.close()

    rows = _rows(path)
    assert rows["/world/cam"]["Transform3D"] == 4
    assert rows["/world/cam/image"]["Pinhole"] == 4 and rows["/world/cam/image"]["EncodedImage"] == 4
    assert rows["/world/cam/image/depth"]["DepthImage"] == 4 and rows["/world/cam/image/confidence"]["Image"] == 4
    assert rows["/world/map/points"]["Points3D"] == logged_new and rows["/world/map/points"]["Clear"] == 2
    assert rows["/world/map/global"]["static:Points3D"] >= 1
    assert rows["/world/trajectory"]["LineStrips3D"] == 3  # one segment per frame after the first
    assert rows["/metrics/fps"]["Scalars"] == 4 and rows["/metrics/fps"]["static:SeriesLines"] == 1
    assert rows["/world/virtual/orbit00/image"]["Pinhole"] == 1 and rows["/world/virtual/orbit01/points"]["Points3D"] == 1
    assert rows["/world"]["static:ViewCoordinates"] == 1
    from rerun.chunk import RrdReader

    chunks = RrdReader(path).store().stream().filter(content="/world/cam").to_chunks()
    names = set().union(*(c.to_record_batch().schema.names for c in chunks))
    assert {"frame", "capture_time"} <= names  # both timelines


def test_spawn_without_display_is_a_clear_error(monkeypatch):
    from streamrecon.sinks.rerun_sink import RerunConfig, RerunSink

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(RuntimeError, match="needs a display"):
        RerunSink(RerunConfig(viewer="spawn"))


def test_a_late_network_frame_is_shown_at_its_own_pose_not_the_current_camera(tmp_path, shared):
    """--network-every: a pose-only frame keeps world/cam; the network frame that arrived with it is
    logged under world/network_cam with its own pose and intrinsics."""
    from streamrecon.sinks.base import FrameEvent
    from streamrecon.sinks.rerun_sink import RerunConfig, RerunSink

    engine = StreamEngine(load_model(shared / "golden" / "tiny_dpt" / "checkpoint.pth"), EngineConfig(size=64))
    rng = np.random.default_rng(0)
    dense = engine.process(Frame(image=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), seq=0, stamp=0.0))
    T = np.eye(4)
    T[:3, 3] = (1.0, 2.0, 3.0)
    pose = type(dense).pose_only(seq=5, stamp=5 / 30, source="", index=5, segment=0, T_wc=T, K=dense.K,
                                 K_original=dense.K_original, crop=dense.crop)
    path = tmp_path / "late.rrd"
    sink = RerunSink(RerunConfig(save_path=str(path)))
    sink.on_frame(FrameEvent(stream_id="", result=pose, new_points=np.zeros((0, 3)), new_colors=np.zeros((0, 3)),
                             map_points=0, dense=(dense,)))
    sink.close()
    rows = _rows(path)
    assert rows["/world/cam"]["Transform3D"] == 1 and "DepthImage" not in rows["/world/cam/image/depth"]
    assert rows["/world/network_cam"]["Transform3D"] == 1 and rows["/world/network_cam/image"]["Pinhole"] == 1
    assert rows["/world/network_cam/image/depth"]["DepthImage"] == 1


def test_tracking_metrics_include_the_depth_fit_residual_where_there_is_one(tmp_path, shared):
    from dataclasses import replace

    from streamrecon.frames import TrackingInfo
    from streamrecon.sinks.rerun_sink import RerunConfig, RerunSink

    model = load_model(shared / "golden" / "tiny_dpt" / "checkpoint.pth")
    engine = StreamEngine(model, EngineConfig(size=64))
    path = tmp_path / "rec.rrd"
    sink = RerunSink(RerunConfig(save_path=str(path)))
    rng = np.random.default_rng(1)
    for k, residual in enumerate([0.05, None, 0.04]):
        r = engine.process(Frame(image=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), seq=k, stamp=k / 10))
        info = TrackingInfo("ok", "pnp", 200, 150, False, 1.0, 3.0, depth_fit="grid" if residual else "scale",
                            depth_fit_residual=residual)
        sink.log_frame(replace(r, tracking=info), np.zeros((0, 3)), np.zeros((0, 3), np.uint8), {})
    sink.close()
    rows = _rows(path)
    assert rows["/metrics/tracking/inliers"]["Scalars"] == 3
    assert rows["/metrics/tracking/depth_fit_residual"]["Scalars"] == 2  # not on the frame without one
