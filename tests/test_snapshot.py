"""Durable streams: the snapshot codec and store, resume equality, refusals of bad snapshots, SIGKILL
during writes, relocalisation in a saved map."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrecon.mapping import read_ply, read_tum
from streamrecon.runner import RunConfig, run
from streamrecon.snapshot import SnapshotError, SnapshotStore, read_snapshot
from streamrecon.snapshot.codec import CodecError, pack, unpack

from .node_helpers import tiny_model

SUN3D = "data/sun3d_studyroom"
K_SUN3D = "570.342205,570.342205,320,240"


def _folder(tmp: Path, shared: Path, name: str, order: list[int], fragment: str = "fragment-1") -> str:
    """An image folder of SUN3D frames in the given order (symlinks; the shared data is not copied)."""
    src = sorted((shared / SUN3D / f"{fragment}-rgbd-frames").glob("*.color.png"))
    d = tmp / name
    d.mkdir()
    for n, i in enumerate(order):
        (d / f"{n:04d}.png").symlink_to(src[i])
    return str(d)


def _tensors_equal(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (NaN equals NaN), plus names only one side has."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            bad.append(k)
        elif x.is_floating_point():
            if not bool(((x == y) | (x.isnan() & y.isnan())).all()):
                bad.append(k)
        elif not bool((x == y).all()):
            bad.append(k)
    return bad


def _diff(a, b, path="") -> list[str]:
    """Where two JSON state trees differ, leaving out timings (names with ``ms`` or ``lat``: wall clock)."""
    def timing(k):
        return isinstance(k, str) and ("ms" in k or "lat" in k)

    if isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b):
        return [d for k in a if not timing(k) for d in _diff(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        if len(a) == 2 and isinstance(a[0], str) and a[0] == b[0] and timing(a[0]):
            return []  # a [key, value] pair of a packed dict whose key is a timing
        return [d for n, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}.{n}")]
    return [] if a == b else [path]


# ------------------------------------------------------------------------------------------ codec, store


def test_codec_round_trip_is_exact():
    from streamrecon.slam.sim3 import LoopEdge

    tree = {"f16": np.arange(6, dtype=np.float16).reshape(2, 3), "u16": np.array([1, 65535], np.uint16),
            "b": np.array([True, False]), "nan": float("nan"), "inf": np.float64(np.inf), "i": np.int64(7),
            "t": torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16), "q": deque([1, (2, 3)], maxlen=5),
            "c": Counter({"ok": 3}), 4: {"x": [None, "s", 1e-300]}, "set": {(1, 2), (3, 4)},
            "edge": LoopEdge(1, 2, np.eye(4), 30, depth=1.25), "zero_d": np.array(2.5)}
    js, tensors = pack(tree, {"LoopEdge": LoopEdge})
    back = unpack(json.loads(json.dumps(js)), tensors, {"LoopEdge": LoopEdge})
    assert back["f16"].dtype == np.float16 and np.array_equal(back["f16"], tree["f16"])
    assert back["u16"].dtype == np.uint16 and back["u16"][1] == 65535 and back["b"].dtype == np.bool_
    assert np.isnan(back["nan"]) and back["inf"] == np.inf and back["i"] == 7
    assert back["t"].dtype == torch.bfloat16 and torch.equal(back["t"], tree["t"])
    assert back["q"].maxlen == 5 and list(back["q"]) == [1, (2, 3)] and back["c"] == Counter({"ok": 3})
    assert back[4] == {"x": [None, "s", 1e-300]} and back["set"] == {(1, 2), (3, 4)}
    assert back["edge"].inliers == 30 and np.array_equal(back["edge"].S_ij, np.eye(4))
    assert back["zero_d"].shape == () and back["zero_d"] == 2.5
    with pytest.raises(TypeError, match="cannot be stored"):
        pack({"x": object()}, {})
    with pytest.raises(CodecError, match="not one a snapshot may hold"):
        unpack(js, tensors, {})  # a class that is not allow-listed is never built
    with pytest.raises(CodecError, match="missing"):
        unpack({"$a": "nope"}, {}, {})


def _write(store: SnapshotStore, i: int, name=None):
    return store.write({"i": i}, {"a": torch.full((1000,), float(i))}, {"frames": i}, name=name)


def test_store_keeps_the_newest_and_names_and_refuses_bad_names(tmp_path):
    store = SnapshotStore(tmp_path / "s", keep=2)
    paths = [_write(store, i) for i in range(4)]
    named = _write(store, 99, name="before_lunch")
    autos = [n for n in store.names() if n.startswith("snap-")]
    assert autos == [p.name for p in paths[-2:]] and "before_lunch" in store.names()
    assert store.latest_name() == paths[-1].name  # a named snapshot does not move LATEST
    assert read_snapshot(tmp_path / "s").state == {"i": 3} and read_snapshot(named).state == {"i": 99}
    assert [r["frames"] for r in store.list() if r["name"] == "before_lunch"] == [99]
    for bad in ("../x", "/etc", ".hidden", "a/b", "", "x" * 65, "LATEST", "snap-0-keep-me", "abc\n"):
        with pytest.raises(SnapshotError):
            _write(store, 1, name=bad)
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.path_of("missing")
    # overwriting a named snapshot: a crash between the two renames leaves the old copy aside; it is put back
    os.replace(named, tmp_path / "s" / ".old-before_lunch")
    _write(store, 5)
    assert read_snapshot(named).state == {"i": 99}


def test_restore_falls_back_past_a_damaged_latest_snapshot(tmp_path):
    from streamrecon.snapshot import read_latest_good

    store = SnapshotStore(tmp_path / "s", keep=3)
    for i in range(3):
        _write(store, i)
        time.sleep(0.01)  # distinct modification times
    latest = store.path_of()
    (latest / "state.json").write_text('{"i": 666}')
    with pytest.raises(SnapshotError, match="other snapshots there"):
        read_snapshot(tmp_path / "s")  # a human asking for the latest is told, with what else there is
    data, damaged = read_latest_good(tmp_path / "s")
    assert data.state == {"i": 1} and len(damaged) == 1 and "state.json" in damaged[0]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated"), ("flip", "corrupted"), ("version", "version 99"), ("format", "not a streamrecon"),
    ("missing", "missing"), ("manifest", "unreadable")])
def test_damaged_snapshots_are_refused_naming_the_problem(tmp_path, damage, message):
    p = _write(SnapshotStore(tmp_path / "s"), 1)
    t = p / "tensors.safetensors"
    if damage == "truncate":
        t.write_bytes(t.read_bytes()[:-10])
    elif damage == "flip":
        b = bytearray(t.read_bytes())
        b[len(b) // 2] ^= 0xFF
        t.write_bytes(bytes(b))
    elif damage in ("version", "format"):
        m = json.loads((p / "manifest.json").read_text())
        m.update(version=99) if damage == "version" else m.update(format="something-else")
        (p / "manifest.json").write_text(json.dumps(m))
    elif damage == "missing":
        (p / "state.json").unlink()
    else:
        (p / "manifest.json").write_text("{not json")
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(p)


def test_sigkill_during_writes_always_leaves_a_loadable_snapshot(tmp_path):
    """A writer killed at random moments, 25 times: the latest snapshot always loads, is whole (holds
    one ``i`` everywhere) and is at most one behind the last one the writer reported done."""
    root = tmp_path / "s"
    rng = np.random.default_rng(0)
    child = Path(__file__).with_name("snapshot_writer_child.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    last_i = 0
    for trial in range(25):
        proc = subprocess.Popen([sys.executable, str(child), str(root), "1", str(last_i)], stdout=subprocess.PIPE,
                                text=True, env=env)
        done = int(proc.stdout.readline())  # one snapshot written: the writer is up
        time.sleep(float(rng.uniform(0.0, 0.25)))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        done = max([done] + [int(x) for x in out.split()])
        data = read_snapshot(root)  # raises if damaged
        i = data.state["i"]
        assert torch.all(data.tensors["a"] == float(i)) and int(data.tensors["b"][0]) == i
        assert done <= i <= done + 1, (trial, done, i)  # the one being renamed may have landed
        last_i = i
    assert len([n for n in SnapshotStore(root).names() if n.startswith("snap-")]) <= 3


# ------------------------------------------------------------------------------------------ resume


def test_resume_equals_the_uninterrupted_run_through_loop_closures(tmp_path, shared):
    """SUN3D fragment-1 there and back (99 frames, loops closed) with ``--backend slam --deterministic``:
    run(0..99) equals run(0..30) + resume(30..60) + resume(60..99) -- every state tensor of the final
    snapshot bit-identical (model state, map, keyframe database, tracker), trajectory and map equal."""
    src = _folder(tmp_path, shared, "tb", list(range(50)) + list(range(48, -1, -1)))
    m = tiny_model()
    base = dict(source=src, size="64", backend="slam", intrinsics=K_SUN3D, deterministic=True, progress=False)
    full = run(RunConfig.of(**base, output_dir=str(tmp_path / "full"), snapshot=str(tmp_path / "full_snap")), model=m)
    for n, stop in enumerate((30, 60, 0)):
        s = run(RunConfig.of(**base, output_dir=str(tmp_path / "part"), snapshot=str(tmp_path / "snap"),
                             max_frames=stop, **({"resume": str(tmp_path / "snap")} if n else {})), model=m)
    assert full.processed == s.processed == 99 and s.slam["loop_closure"]["closures"] >= 1
    _, T_full = read_tum(tmp_path / "full" / "trajectory.txt")
    _, T_part = read_tum(tmp_path / "part" / "trajectory.txt")
    assert T_full.shape == T_part.shape == (99, 4, 4) and np.array_equal(T_full, T_part)
    a, b = read_ply(tmp_path / "full" / "map.ply"), read_ply(tmp_path / "part" / "map.ply")
    assert len(a["x"]) > 0 and all(np.array_equal(a[k], b[k]) for k in a)
    A, B = read_snapshot(tmp_path / "full_snap"), read_snapshot(tmp_path / "snap")
    assert len(A.tensors) > 100 and _tensors_equal(A.tensors, B.tensors) == []
    assert _diff(A.state, B.state) == [], _diff(A.state, B.state)[:10]
    assert B.manifest["source"] == {"spec": src, "path": str(Path(src).resolve()), "stride": 1, "taken": 99,
                                    "live": False}


def test_cli_resume_continues_a_file_source_where_it_stopped(tmp_path, shared):
    """``streamrecon run`` killed-and-resumed by hand with the network backend: 2 + 2 frames equal 4."""
    clip = str(shared / "data/cut3r_examples/003")
    w = str(shared / "golden/tiny_dpt/checkpoint.pth")
    common = [sys.executable, "-m", "streamrecon", "run", clip, "--weights", w, "--size", "64", "--no-progress",
              "--backend", "none"]

    def cli(*args):
        r = subprocess.run(common + list(args), capture_output=True, text=True, timeout=300)
        return r

    assert cli("--output-dir", str(tmp_path / "full")).returncode == 0
    r = cli("--output-dir", str(tmp_path / "a"), "--snapshot", str(tmp_path / "snap"), "--max-frames", "2")
    assert r.returncode == 0, r.stderr
    r = cli("--output-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "snap"))
    assert r.returncode == 0, r.stderr
    _, T_full = read_tum(tmp_path / "full" / "trajectory.txt")
    _, T_b = read_tum(tmp_path / "b" / "trajectory.txt")
    assert T_full.shape == (4, 4, 4) and np.array_equal(T_full, T_b)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["processed"] == 4
    # a snapshot from other weights, another size: refused before any frame, exit 2, naming the problem
    other = tmp_path / "other.safetensors"
    from streamrecon.checkpoint import load_model
    from streamrecon.checkpoint.io import write_safetensors

    model = load_model(w)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    first = sorted(sd)[0]
    sd[first] = sd[first] + 1e-3  # one weight changed: other weights, same architecture
    write_safetensors(sd, model.cfg, other)
    r = subprocess.run([sys.executable, "-m", "streamrecon", "run", clip, "--weights", str(other), "--size", "64",
                        "--backend", "none", "--no-progress", "--output-dir", str(tmp_path / "c"), "--resume",
                        str(tmp_path / "snap")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "other weights" in r.stderr, r.stderr
    r = cli("--output-dir", str(tmp_path / "d"), "--resume", str(tmp_path / "snap"), "--size", "96")
    assert r.returncode == 2 and "--size" in r.stderr, r.stderr
    r = cli("--output-dir", str(tmp_path / "e"), "--resume", str(tmp_path / "snap"), "--backend", "track")
    assert r.returncode == 2 and "backend is 'none'" in r.stderr, r.stderr
    r = cli("--output-dir", str(tmp_path / "f"), "--resume", str(tmp_path / "snap"), "--intrinsics", "500,500,270,360")
    assert r.returncode == 2 and "intrinsics" in r.stderr, r.stderr
    assert not (tmp_path / "f" / "trajectory.txt").exists()  # refused before any frame


def test_a_refused_snapshot_changes_nothing(tmp_path, shared):
    """A snapshot whose state does not fit (tampered, with a valid checksum) is refused as a whole: the
    pipeline keeps its fresh state, map and trajectory."""
    import hashlib

    from streamrecon.engine import Frame
    from streamrecon.pipeline import LoadedModel, build_pipeline
    from streamrecon.settings import PipelineConfig, SlamSettings

    loaded = LoadedModel.wrap(tiny_model())
    cfg = PipelineConfig(slam=SlamSettings(backend="track", intrinsics=K_SUN3D, deterministic=True))
    pipe = build_pipeline(cfg, loaded, files=False, snapshot_dir=tmp_path / "s")
    src = sorted((shared / SUN3D / "fragment-1-rgbd-frames").glob("*.color.png"))
    from streamrecon.sources.files import _read_rgb

    for i in range(3):
        pipe.push(Frame(image=_read_rgb(src[i]), seq=i, stamp=float(i), source="x"))
    p = pipe.save_snapshot("three")
    pipe.close()
    state = json.loads((p / "state.json").read_text())
    del state["$d"][1][1]["$d"][0]  # drop one pipeline field
    data = json.dumps(state, separators=(",", ":")).encode()
    (p / "state.json").write_bytes(data)
    m = json.loads((p / "manifest.json").read_text())
    m["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (p / "manifest.json").write_text(json.dumps(m))
    fresh = build_pipeline(cfg, loaded, files=False)
    before = fresh.engine.state.tokens.clone()
    with pytest.raises(SnapshotError, match="pipeline"):
        fresh.restore(read_snapshot(p))
    assert torch.equal(fresh.engine.state.tokens, before) and fresh.processed == 0 and len(fresh.gmap) == 0
    assert len(fresh.trajectory) == 0 and fresh.stage.tracker.index == -1
    fresh.close()


# ------------------------------------------------------------------------------------------ relocalise


def test_relocalise_in_a_saved_map_and_extend_it(tmp_path, shared):
    """Map SUN3D fragment-1's first 25 frames, snapshot; a new run on the same part, every third frame
    backwards, localises in the saved world (its poses near the saved ones of the same frames, far nearer
    than without relocalisation) and extends the same map; frames of another room never localise."""
    m = tiny_model()
    base = dict(size="64", backend="slam", intrinsics=K_SUN3D, deterministic=True, progress=False)
    first = _folder(tmp_path, shared, "first", list(range(25)))
    s1 = run(RunConfig.of(**base, source=first, output_dir=str(tmp_path / "map"), snapshot=str(tmp_path / "snap")),
             model=m)
    _, T_saved = read_tum(tmp_path / "map" / "trajectory.txt")
    order = list(range(24, -1, -3))
    again = _folder(tmp_path, shared, "again", order)
    s2 = run(RunConfig.of(**base, source=again, output_dir=str(tmp_path / "reloc"), relocalise=str(tmp_path / "snap")),
             model=m)
    info = s2.slam["relocalise"]
    assert info["localised"] and info["inliers"] >= 25 and info["keyframes"] == s1.slam["keyframes"], info
    _, T_opt = read_tum(tmp_path / "reloc" / "trajectory_optimized.txt")  # every frame in the saved world
    s3 = run(RunConfig.of(**base, source=again, output_dir=str(tmp_path / "plain")), model=m)
    _, T_plain = read_tum(tmp_path / "plain" / "trajectory.txt")
    err = np.linalg.norm(T_opt[:, :3, 3] - T_saved[order, :3, 3], axis=1)
    err_plain = np.linalg.norm(T_plain[:, :3, 3] - T_saved[order, :3, 3], axis=1)
    path = np.linalg.norm(np.diff(T_saved[:, :3, 3], axis=0), axis=1).sum()
    assert np.median(err) < 0.15 * path and np.median(err) < 0.5 * np.median(err_plain), (err, err_plain, path)
    # the same map, extended: it shares far more of the saved map's space (8 cm cells) than the map of
    # the same frames without relocalisation (its own world)
    def cells(path):
        ply = read_ply(path)
        return set(map(tuple, np.floor(np.stack([ply["x"], ply["y"], ply["z"]], 1) / 0.08).astype(int)))

    saved, extended, plain = (cells(tmp_path / d / "map.ply") for d in ("map", "reloc", "plain"))
    assert len(saved & extended) > max(0.25 * len(saved), 3 * len(saved & plain)), (len(saved), len(saved & extended),
                                                                                     len(saved & plain))
    assert s3.processed == len(order)
    # another room: never localised, reported so on every frame, the saved map untouched
    other = _folder(tmp_path, shared, "other", list(range(0, 10)), fragment="fragment-2")
    flags = []
    s4 = run(RunConfig.of(**base, source=other, output_dir=str(tmp_path / "other_out"),
                          relocalise=str(tmp_path / "snap")), model=m, on_result=lambda r: flags.append(r.tracking.localised))
    assert not s4.slam["relocalise"]["localised"] and s4.slam["relocalise"]["attempts"] == 10
    assert flags == [False] * 10 and s4.map["points"] == s1.map["points"]
    # a relocalising run snapshotted before it localised resumes still relocalising (nothing enters the map)
    run(RunConfig.of(**base, source=other, output_dir=str(tmp_path / "o2"), relocalise=str(tmp_path / "snap"),
                     snapshot=str(tmp_path / "snap_reloc"), max_frames=5), model=m)
    flags = []
    s5 = run(RunConfig.of(**base, source=other, output_dir=str(tmp_path / "o3"), resume=str(tmp_path / "snap_reloc"),
                          snapshot=str(tmp_path / "snap_reloc")), model=m, on_result=lambda r: flags.append(r.tracking.localised))
    assert flags == [False] * 5 and s5.processed == 10 and s5.map["points"] == s1.map["points"]
    assert s5.slam["relocalise"]["attempts"] == 10 and not s5.slam["relocalise"]["localised"]
    # a snapshot without a keyframe database cannot be relocalised in
    run(RunConfig.of(source=first, size="64", backend="none", progress=False, output_dir=str(tmp_path / "n"),
                     snapshot=str(tmp_path / "snap_none"), max_frames=2), model=m)
    with pytest.raises(SnapshotError, match="keyframe database"):
        run(RunConfig.of(**base, source=again, output_dir=str(tmp_path / "x"), relocalise=str(tmp_path / "snap_none")),
            model=m)


def test_snapshot_every_frames_or_seconds():
    from streamrecon.settings import SettingsError
    from streamrecon.snapshot.writer import SnapshotPolicy, Snapshotter, parse_every

    assert parse_every("200") == (200, 0.0) and parse_every("30s") == (0, 30.0) and parse_every(None) == (0, 0.0)
    assert parse_every("2.5s") == (0, 2.5)
    for bad in ("ten", "5m", "-3", "2.5"):
        with pytest.raises(ValueError, match="snapshot-every"):
            parse_every(bad)
    with pytest.raises(SettingsError, match="snapshot-every"):
        RunConfig.of(source="x", snapshot_every="soon").validate()
    with pytest.raises(SettingsError, match="not both"):
        RunConfig.of(source="x", resume="a", relocalise="b").validate()
    with pytest.raises(SettingsError, match="backend slam"):
        RunConfig.of(source="x", relocalise="b", backend="track").validate()
    s = Snapshotter(SnapshotPolicy(Path("unused"), every_frames=0, every_s=0.05))
    assert not s.due(1)
    time.sleep(0.06)
    assert s.due(1)
    f = Snapshotter(SnapshotPolicy(Path("unused"), every_frames=3))
    assert [f.due(n) for n in (1, 2, 3)] == [False, False, True]


def test_a_resumed_stream_shows_its_restored_map_at_once(tmp_path, shared):
    """The viewer of a resumed stream gets the whole restored map with the first new frame (not only at
    the next consolidation), and the restored trajectory reaches the file sink first."""
    from streamrecon.engine import Frame
    from streamrecon.pipeline import LoadedModel, build_pipeline
    from streamrecon.settings import OutputSettings, PipelineConfig
    from streamrecon.sources.files import _read_rgb

    class Viewer:
        name = "viewer"

        def __init__(self):
            self.events = []

        def on_frame(self, e):
            self.events.append(e)

        def on_probe(self, p):
            pass

        def close(self, final):
            pass

    loaded = LoadedModel.wrap(tiny_model())
    cfg = PipelineConfig(outputs=OutputSettings(output_dir=str(tmp_path / "out"), consolidate_every=1000))
    imgs = [_read_rgb(p) for p in sorted((shared / SUN3D / "fragment-1-rgbd-frames").glob("*.color.png"))[:4]]
    pipe = build_pipeline(cfg, loaded, snapshot_dir=tmp_path / "s")
    for i in range(2):
        pipe.push(Frame(image=imgs[i], seq=i, stamp=float(i), source="x"))
    pipe.close()
    v = Viewer()
    again = build_pipeline(cfg, loaded, extra_sinks=[v])
    again.restore(read_snapshot(tmp_path / "s"))
    for i in range(2, 4):
        again.push(Frame(image=imgs[i], seq=i, stamp=float(i), source="x"))
    again.close()
    first = v.events[0].map_snapshot
    assert first is not None and len(first[0]) >= pipe.closed.map["points"] > 0 and v.events[1].map_snapshot is None
    _, T = read_tum(tmp_path / "out" / "trajectory.txt")
    assert len(T) == 4
