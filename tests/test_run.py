"""``streamrecon run`` end to end on real clips with the tiny golden checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from streamrecon.cli import main as cli_main
from streamrecon.cli.run_cmd import load_run_config
from streamrecon.mapping import read_ply, read_tum
from streamrecon.runner import RunConfig, run

CLIP = "data/cut3r_examples/003"  # 4 portrait frames, 540x720


@pytest.fixture
def tiny_dpt(shared):
    return str(shared / "golden" / "tiny_dpt" / "checkpoint.pth")


def test_cli_run_on_a_real_clip_writes_every_output(tmp_path, shared, tiny_dpt):
    out = tmp_path / "out"
    cams = tmp_path / "cams.json"
    cams.write_text(json.dumps([{"name": "side", "T_wc": np.eye(4).tolist(), "size": [32, 48],
                                 "K": [[40, 0, 24], [0, 40, 16], [0, 0, 1]]}]))
    r = subprocess.run([sys.executable, "-m", "streamrecon", "run", str(shared / CLIP), "--weights", tiny_dpt,
                        "--size", "64", "--output-dir", str(out), "--save-rrd", str(out / "rec.rrd"), "--save-frames",
                        "--probe", "orbit:2", "--probe", f"{cams}@1", "--no-progress"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "processed 4" in r.stderr and "p50/p99" in r.stderr  # the one-screen summary
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_in"] == 4 and summary["processed"] == 4 and summary["errors"] == 0
    assert summary["dropped"] == 0 and summary["interrupted"] is False
    for stage in ("source", "preprocess", "model", "postprocess", "map", "sinks"):
        assert summary["latency_ms"][stage]["p99"] >= summary["latency_ms"][stage]["p50"] >= 0, stage
    assert summary["memory_mb"]["peak_rss"] > 0
    stamps, T = read_tum(out / "trajectory.txt")
    assert len(stamps) == 4
    for i in range(4):
        f = np.load(out / "frames" / f"{i:06d}.npz")
        assert np.allclose(f["T_wc"], T[i], atol=1e-6)
        assert f["points_cam"].shape == (64, 48, 3) and f["K"].shape == (3, 3) and f["conf_cam"].shape == (64, 48)
        assert np.allclose(f["K_original"][0, 0], f["K"][0, 0] * 540 / 48)  # intrinsics back in original pixels
    ply = read_ply(out / "map.ply")
    assert len(ply["x"]) == summary["map"]["points"] > 0
    import trimesh

    assert len(trimesh.load(out / "map.glb").geometry) == 2  # map + camera path
    assert sorted(p.name for p in (out / "probes").iterdir()) == [
        "orbit00_000003.npz", "orbit00_000003.png", "orbit00_000003_map.png", "orbit01_000003.npz",
        "orbit01_000003.png", "orbit01_000003_map.png", "side_000001.npz", "side_000001.png",
        "side_000001_map.png"]  # numbered like frames/: the last frame the state has seen; _map: the map's view
    side = np.load(out / "probes" / "side_000001.npz")
    assert side["rgb"].shape == (32, 48, 3) and np.allclose(side["K"][0, 0], 40)
    assert side["map_rgb"].shape == (32, 48, 3) and side["map_mask"].dtype == bool and side["disagreement"].shape == (32, 48)
    assert (out / "rec.rrd").stat().st_size > 0
    assert sorted(summary["outputs"]) == ["frames/", "map.glb", "map.ply", "probes/", "summary.json", "trajectory.txt"]
    assert summary["sinks"]["files"]["errors"] == 0 and summary["sinks"]["files"]["dropped"] == 0
    assert summary["in_progress"] is False


def test_yaml_config_with_flag_overrides(tmp_path, shared, tiny_dpt):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"max_frames: 2\nengine:\n  weights: {tiny_dpt}\n  size: 64\n  state_policy: ttt3r\n"
                        f"  reset_every: 2\noutputs:\n  output_dir: {tmp_path / 'a'}\nmap:\n  map_points: head\n")
    cfg = load_run_config(cfg_file, {"source": str(shared / CLIP), "max_frames": 3, "progress": False})
    e = cfg.pipeline.engine
    assert e.state_policy == "ttt3r" and cfg.max_frames == 3 and e.model_size() == 64
    summary = run(cfg)
    assert summary["processed"] == 3 and summary["model"]["policy"] == "ttt3r" and summary["segments"] == 2
    assert summary["config"]["map_points"] == "head" and summary["map"]["points"] > 0
    from streamrecon.settings import SettingsError

    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 3\n")
    with pytest.raises(SettingsError, match="unknown settings"):
        load_run_config(bad, {})
    bad.write_text("map:\n  weights: x\n")  # a setting in the wrong section
    with pytest.raises(SettingsError, match=r"map\.weights"):
        load_run_config(bad, {})
    # the shipped config file is valid
    from .conftest import REPO

    assert load_run_config(REPO / "configs" / "run.yaml", {"source": "x"}).pipeline.map.voxel_size == 0.02


def test_clear_errors_without_tracebacks(tmp_path, shared, tiny_dpt, capsys):
    def err(*argv):
        code = cli_main(["run", *argv, "--no-progress", "--output-dir", str(tmp_path / "o")])
        return code, capsys.readouterr().err

    code, msg = err(str(tmp_path / "missing"), "--weights", tiny_dpt)
    assert code == 2 and "no such file, folder or camera" in msg
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00" * 100)
    code, msg = err(str(video), "--weights", tiny_dpt)
    assert code == 2 and "cannot decode video" in msg
    code, msg = err("cam:/dev/video97", "--weights", tiny_dpt)
    assert code == 2 and "cannot open camera" in msg
    bad = tmp_path / "wrong.pth"  # the right container and model string, but weights for another model
    model_sd = {"pose_token": torch.zeros(1, 1, 24)}
    torch.save({"model": model_sd, "args": {"model": open(shared / "golden" / "tiny_dpt" / "README.md").read()
                                            .split("```")[1].strip()}, "epoch": 0}, bad)
    code, msg = err(str(shared / CLIP), "--weights", str(bad))
    assert code == 2 and "incompatible checkpoint" in msg and "missing keys" in msg
    code, msg = err(str(shared / CLIP), "--weights", tiny_dpt, "--probe", "sphere:3")
    assert code == 2 and "--probe" in msg
    assert "Traceback" not in msg


def test_an_empty_map_is_reported_with_the_confidence_seen(tmp_path, shared, tiny_dpt, caplog):
    with caplog.at_level("WARNING", logger="streamrecon.pipeline.pipeline"):
        summary = run(RunConfig.of(source=str(shared / CLIP), weights=tiny_dpt, size=64, repeat=3, conf_thresh=1e9,
                                output_dir=str(tmp_path / "o"), progress=False))
    assert summary["processed"] == 12 and summary["map"]["points"] == 0
    assert 1.0 < summary["map"]["confidence_max"] < 1e9
    assert sum("the map is empty" in r.getMessage() for r in caplog.records) == 1


def test_bad_frames_are_counted_and_the_run_goes_on(tmp_path, shared, tiny_dpt):
    folder = tmp_path / "clip"
    shutil.copytree(shared / CLIP, folder)
    (folder / "frame_00100.jpg").write_bytes(b"not a jpeg")  # undecodable
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "frame_00200.png")  # too small for the model
    summary = run(RunConfig.of(source=str(folder), weights=tiny_dpt, size=64, output_dir=str(tmp_path / "o"),
                            progress=False))
    assert summary["processed"] == 4 and summary["errors"] == 2
    assert any("frame_00100.jpg" in m for m in summary["error_messages"])
    assert any("too small" in m for m in summary["error_messages"])
    assert len(read_tum(tmp_path / "o" / "trajectory.txt")[0]) == 4


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_stops_cleanly_writes_every_output_and_exits_like_the_shell(tmp_path, shared, tiny_dpt, sig, code):
    out = tmp_path / "o"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("outputs:\n  flush_every: 10\n")  # from YAML; flags override the rest
    proc = subprocess.Popen([sys.executable, "-m", "streamrecon", "run", str(shared / CLIP), "--weights", tiny_dpt,
                             "--config", str(cfg), "--size", "64", "--repeat", "500", "--output-dir", str(out),
                             "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 120
        traj, running = out / "trajectory.txt", out / "summary.json"  # both flushed after flush_every (10) frames
        while not running.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1]
        assert running.exists(), "the run never flushed its summary"
        periodic = json.loads(running.read_text())
        assert periodic["in_progress"] is True and periodic["stop_reason"] == "running"
        assert len(read_tum(traj)[0]) >= 10  # fsynced with the periodic summary
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err  # 128 + the signal, as a shell reports it; outputs written all the same
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["stop_reason"] == sig.name
    assert 10 <= summary["processed"] < 2000
    assert len(read_tum(traj)[0]) == summary["processed"]
    assert len(read_ply(out / "map.ply")["x"]) == summary["map"]["points"]


def test_a_killed_run_leaves_a_recent_map_and_says_it_did_not_finish(tmp_path, shared, tiny_dpt):
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "streamrecon", "run", str(shared / CLIP), "--weights", tiny_dpt,
                             "--size", "64", "--repeat", "500", "--output-dir", str(out), "--no-progress",
                             "--flush-every", "0", "--flush-every-s", "0.2", "--map-every-s", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    summary = out / "summary.json"

    def flushed_with_map() -> bool:
        return summary.exists() and (out / "map.ply").exists() and json.loads(summary.read_text())["processed"] >= 5

    try:
        deadline = time.monotonic() + 120
        while not flushed_with_map() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None and flushed_with_map(), "no periodic summary and map before the kill"
        proc.send_signal(signal.SIGKILL)  # no handler runs: only what was written before stays
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    s = json.loads(summary.read_text())
    assert s["in_progress"] is True and s["stop_reason"] == "running" and s["processed"] >= 5
    assert len(read_tum(out / "trajectory.txt")[0]) >= s["processed"]  # fsynced with each periodic summary
    assert len(read_ply(out / "map.ply")["x"]) > 0 and (out / "map.glb").stat().st_size > 0


def test_the_map_threshold_follows_the_checkpoint_unless_given():
    from streamrecon.checkpoint import CheckpointInfo
    from streamrecon.pipeline import DEFAULT_CONF_THRESH, resolve_conf_thresh

    calibrated = CheckpointInfo(format="safetensors", meta={"conf_thresh": "1.07"})
    assert resolve_conf_thresh(calibrated) == 1.07
    assert resolve_conf_thresh(calibrated, 3.0) == 3.0 and resolve_conf_thresh(calibrated, 0.0) == 0.0
    assert resolve_conf_thresh(CheckpointInfo(format="pth")) == DEFAULT_CONF_THRESH == 1.5
    from streamrecon.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="conf_thresh"):  # not a silent fallback: the metadata is wrong
        resolve_conf_thresh(CheckpointInfo(meta={"conf_thresh": "oops"}))
    assert resolve_conf_thresh(CheckpointInfo(meta={"conf_thresh": "oops"}), 2.0) == 2.0  # given: not consulted
    assert resolve_conf_thresh(None) == 1.5


def test_a_run_refuses_a_folder_holding_an_earlier_run_unless_overwrite(tmp_path, shared, tiny_dpt, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not a run output: never touched
    args = ["run", str(shared / CLIP), "--weights", tiny_dpt, "--size", "64", "--output-dir", str(out), "--no-progress"]
    assert cli_main(args + ["--save-frames", "--save-rrd", str(out / "recording.rrd")]) == 0
    err = capsys.readouterr().err
    assert "frames/ (4 files)" in err and f"recording   {out / 'recording.rrd'}" in err  # every output named
    before = (out / "trajectory.txt").read_bytes()

    assert cli_main(args) == 2  # an earlier run's outputs: refused, nothing changed
    err = capsys.readouterr().err
    assert "holds an earlier run's outputs" in err and "frames/" in err and "--overwrite" in err
    assert (out / "trajectory.txt").read_bytes() == before and len(list((out / "frames").iterdir())) == 4

    bad = ["run", str(tmp_path / "missing.mp4")] + args[2:] + ["--overwrite"]
    assert cli_main(bad) == 2 and "no such file" in capsys.readouterr().err  # a typo costs nothing
    assert (out / "trajectory.txt").read_bytes() == before and (out / "frames").is_dir()
    assert cli_main(args + ["--overwrite", "--resume", str(out)]) == 2  # one or the other
    assert "not both" in capsys.readouterr().err

    assert cli_main(args + ["--overwrite"]) == 0  # replaced: no frames/ or recording of the earlier run remain
    summary = json.loads((out / "summary.json").read_text())
    assert not (out / "frames").exists() and not (out / "recording.rrd").exists()
    assert sorted(summary["outputs"]) == ["map.glb", "map.ply", "summary.json", "trajectory.txt"]
    assert (out / "notes.txt").read_text() == "mine"


def test_claim_output_dir_names_only_run_outputs(tmp_path):
    from streamrecon.settings import SettingsError
    from streamrecon.sinks.output_dir import RUN_OUTPUTS, claim_output_dir, earlier_outputs

    d = tmp_path / "o"
    assert claim_output_dir(d) == [] and d.is_dir()  # created
    (d / "snapshots").mkdir()
    (d / "README").write_text("x")
    assert claim_output_dir(d) == []  # snapshots and the user's files are not an earlier run
    (d / "probes").mkdir()
    (d / "map.ply").write_text("x")
    assert earlier_outputs(d) == ["map.ply", "probes/"] and set(earlier_outputs(d)) <= set(RUN_OUTPUTS)
    with pytest.raises(SettingsError, match="map.ply, probes/"):
        claim_output_dir(d)
    (d / "probes" / "orbit_0_000003.png").write_text("x")  # seen by a snapshot taken after 5 frames
    (d / "probes" / "orbit_0_000007.png").write_text("x")  # after it: not part of the resumed run
    (d / "keyframes.txt").write_text("x")  # an end-of-run file the resumed run may never write again
    assert claim_output_dir(d, resume_frames=5, dry_run=True) == ["keyframes.txt", "map.ply", "probes/"]
    assert (d / "keyframes.txt").exists()  # a dry run removes nothing
    assert claim_output_dir(d, resume_frames=5) == ["keyframes.txt", "map.ply", "probes/"]
    assert (d / "map.ply").exists() and not (d / "keyframes.txt").exists()  # continued: rewritten at the end
    assert sorted(p.name for p in (d / "probes").iterdir()) == ["orbit_0_000003.png"]
    with pytest.raises(SettingsError, match="which this run reads"):  # never remove the run's own input
        claim_output_dir(d, overwrite=True, keep=[d / "probes" / "orbit_0_000003.png"])
    assert claim_output_dir(d, overwrite=True) == ["map.ply", "probes/"]
    assert earlier_outputs(d) == [] and (d / "snapshots").is_dir() and (d / "README").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(SettingsError, match="is a file"):
        claim_output_dir(tmp_path / "f")


@pytest.mark.parametrize("as_folder", [False, True], ids=["photo.jpg", "folder-of-one"])
def test_a_single_image_gives_its_pointmap_depth_focal_and_a_ply(tmp_path, shared, tiny_dpt, as_folder):
    photo = sorted((shared / CLIP).iterdir())[0]
    src = photo
    if as_folder:
        (tmp_path / "one").mkdir()
        src = tmp_path / "one" / photo.name
        shutil.copy(photo, src)
    out = tmp_path / "o"
    code = cli_main(["run", str(src), "--weights", tiny_dpt, "--size", "64", "--output-dir", str(out), "--no-progress",
                     "--conf-thresh", "0"])
    assert code == 0
    f = np.load(out / "frames" / "000000.npz")  # written without --save-frames: a photo's outputs are this file
    h, w = f["depth"].shape
    assert f["points_cam"].shape == (h, w, 3) and f["conf_cam"].shape == (h, w) and f["K"][0, 0] > 0
    ply = read_ply(out / "pointmap.ply")
    assert len(ply["x"]) == int(np.isfinite(f["points_cam"]).all(-1).sum()) > 0.9 * h * w  # every pixel
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processed"] == 1 and "pointmap.ply" in summary["outputs"]


def test_export_colmap_is_read_back_by_pycolmap(tmp_path, shared, tiny_dpt):
    pycolmap = pytest.importorskip("pycolmap")
    out = tmp_path / "o"
    assert cli_main(["run", str(shared / CLIP), "--weights", tiny_dpt, "--size", "64", "--output-dir", str(out),
                     "--no-progress", "--conf-thresh", "0", "--export", "colmap"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    _, T = read_tum(out / "trajectory.txt")
    for sub in ("sparse/0", "sparse/0_text"):  # binary and text models, read back by COLMAP's own library
        rec = pycolmap.Reconstruction(str(out / "colmap" / sub))
        assert rec.num_cameras() == rec.num_images() == 4 and rec.num_points3D() == summary["map"]["points"] > 0
        for i, img in sorted(rec.images.items()):
            cam_from_world = img.cam_from_world() if callable(img.cam_from_world) else img.cam_from_world
            T_cw = np.eye(4)
            T_cw[:3] = cam_from_world.matrix()
            assert np.allclose(np.linalg.inv(T_cw), T[i - 1], atol=1e-4)  # T_wc of the trajectory
            cam = rec.cameras[img.camera_id]
            assert (cam.width, cam.height) == (540, 720) and (out / "colmap" / "images" / img.name).is_file()
    tf = json.loads((out / "colmap" / "transforms.json").read_text())
    assert len(tf["frames"]) == 4 and (out / "colmap" / tf["ply_file_path"]).is_file()
    M = np.array(tf["frames"][0]["transform_matrix"])
    assert np.allclose(M @ np.diag([1.0, -1, -1, 1]), T[0], atol=1e-6)  # OpenGL axes for nerfstudio
    assert "colmap/" in summary["outputs"]


def test_revisit_reads_every_frame_again_against_the_final_state(tmp_path, shared, tiny_dpt, capsys):
    import torch

    from streamrecon.engine import EngineConfig, Frame, StreamEngine

    from .node_helpers import tiny_model

    e = StreamEngine(tiny_model(),
                     EngineConfig(size=64))
    imgs = [np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8) for i in range(3)]
    for i, img in enumerate(imgs):
        e.process(Frame(image=img, seq=i, stamp=float(i)))
    final = e.state
    e.revisit()
    r = e.process(Frame(image=imgs[0], seq=0, stamp=0.0))
    assert r.index == 0 and torch.equal(e.state.tokens, final.tokens) and torch.equal(e.state.mem, final.mem)
    outs = {}
    for flag in ((), ("--revisit",)):
        out = tmp_path / ("revisit" if flag else "plain")
        assert cli_main(["run", str(shared / CLIP), "--weights", tiny_dpt, "--size", "64", "--output-dir", str(out),
                         "--no-progress", *flag]) == 0
        outs[bool(flag)] = read_tum(out / "trajectory.txt")
    assert len(outs[True][0]) == len(outs[False][0]) == 4 and np.allclose(outs[True][0], outs[False][0])
    assert not np.allclose(outs[True][1][0], outs[False][1][0])  # frame 0 is read against the whole sequence now
    live = f"live:{shared / 'data/cut3r_examples/lady-running.mp4'}"
    capsys.readouterr()
    assert cli_main(["run", live, "--revisit", "--weights", tiny_dpt, "--output-dir", str(tmp_path / "cam")]) == 2
    assert "--revisit needs a file source" in capsys.readouterr().err
