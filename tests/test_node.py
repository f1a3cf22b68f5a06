"""The ZeroMQ node: streams, live vs lossless, batching, control, imagezmq, reliability."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
import zmq

from streamrecon import wire
from streamrecon.mapping import read_ply, read_tum
from streamrecon.server import ServeConfig, is_loopback_endpoint
from streamrecon_bridges.camera_pub import Publisher
from streamrecon_bridges.results_sub import ResultsSubscriber

from .node_helpers import Client, frames, free_endpoints, poses, running_node, wait_for


def _stats(client):
    reply, _ = client.request("stats")
    return reply


def test_frames_in_poses_geometry_and_status_out(tmp_path):
    with running_node(tmp_path) as node:
        c = Client(node)
        time.sleep(0.3)  # let the SUB join
        pub = Publisher(node.endpoints["ingest"], "cam1", lossless=True)
        imgs = frames(5)
        K = np.array([[60.0, 0, 32], [0, 60, 24], [0, 0, 1]])
        for i, img in enumerate(imgs):
            pub.send(img, stamp_ns=1_000_000_000 + i, K=K)
        assert pub.flush(30) and pub.stats()["acked"] == 5
        res = c.collect(lambda r: len(poses(r, "cam1")) == 5
                        and any(t == "cam1/status" and h["processed"] == 5 for t, h, _ in r))
        ps = poses(res, "cam1")
        assert [p["seq"] for p in ps] == list(range(5)) and ps[2]["stamp_ns"] == 1_000_000_002
        T = np.asarray(ps[4]["T_wc"]).reshape(4, 4)
        assert np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-5) and ps[4]["latency_ms"] > 0
        geo = [(h, a) for t, h, a in res if t == "cam1/geometry"]
        assert geo and geo[0][1]["points"].dtype == np.float16 and geo[0][1]["points"].shape == (12, 16, 3)
        status = [h for t, h, _ in res if t == "cam1/status"][-1]
        assert status["processed"] == 5 and status["mode"] == "lossless" and status["errors"] == 0
        pub.close()
        c.close()


def test_live_stream_keeps_the_newest_frame_and_counts_drops(tmp_path):
    with running_node(tmp_path) as node:
        c = Client(node)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(node.endpoints["ingest"])
        for i, img in enumerate(frames(40)):
            sock.send_multipart(wire.encode_frame(img, "live", i))  # as fast as possible, no acks
        assert wait_for(lambda: (s := _stats(c)["streams"].get("live")) and s["queue_depth"] == 0
                        and s["processed"] + s["dropped"] == 40)
        s = _stats(c)["streams"]["live"]
        assert s["dropped"] > 0 and s["processed"] < 40 and s["received"] == 40
        sock.close(0)
        c.close()


def test_lossless_delivers_every_frame_in_order(tmp_path):
    with running_node(tmp_path) as node:
        c = Client(node)
        time.sleep(0.3)
        pub = Publisher(node.endpoints["ingest"], "rec", lossless=True, window=3)
        for img in frames(20):
            pub.send(img)
        assert pub.flush(60)
        res = c.collect(lambda r: len(poses(r, "rec")) == 20)
        assert [p["seq"] for p in poses(res, "rec")] == list(range(20))
        s = _stats(c)["streams"]["rec"]
        assert s["processed"] == 20 and s["dropped"] == 0 and s["duplicates"] == 0
        pub.close()
        c.close()


def _run_streams(tmp_path, name, max_batch):
    with running_node(tmp_path / name, max_batch=max_batch, lossless=True) as node:
        c = Client(node)
        time.sleep(0.3)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(node.endpoints["ingest"])
        for i in range(6):  # all queued at once, so the node can batch the three streams
            for k in range(3):
                sock.send_multipart(wire.encode_frame(frames(6, seed=k)[i], f"s{k}", i))
        res = c.collect(lambda r: len(poses(r)) == 18)
        stats = _stats(c)["node"]
        sock.close(0)
        c.close()
    return {(p["stream_id"], p["seq"]): np.asarray(p["T_wc"]) for p in poses(res)}, stats


def test_batched_streams_equal_one_by_one(tmp_path):
    batched, stats_b = _run_streams(tmp_path, "b", max_batch=3)
    single, stats_s = _run_streams(tmp_path, "s", max_batch=1)
    assert stats_b["batched_calls"] > 0 and stats_b["max_batch_seen"] >= 2
    assert stats_s["batched_calls"] == 0 and stats_s["model_calls"] == 18
    assert batched.keys() == single.keys() and len(batched) == 18
    for key in batched:
        assert np.allclose(batched[key], single[key], atol=1e-4), key


def test_control_commands(tmp_path):
    with running_node(tmp_path) as node:
        c = Client(node)
        pub = Publisher(node.endpoints["ingest"], "cam", lossless=True)
        for img in frames(3):
            pub.send(img)
        assert pub.flush(30)
        reply, _ = c.request("ping")
        assert reply["ok"] and reply["protocol"] == 1
        before = _stats(c)["streams"]["cam"]
        reply, arrays = c.request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist())
        assert reply["ok"] and arrays["points_cam"].shape == (48, 64, 3) and arrays["rgb"].dtype == np.uint8
        reply2, arrays2 = c.request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist(), size=[32, 32],
                                    K=[[30, 0, 16], [0, 30, 16], [0, 0, 1]])
        assert reply2["ok"] and arrays2["conf"].shape == (32, 32)
        _, again = c.request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist())
        assert np.array_equal(again["points_cam"], arrays["points_cam"])  # the state did not move
        assert _stats(c)["streams"]["cam"]["processed"] == before["processed"]
        for bad in ({"stream_id": "nope", "T_wc": np.eye(4).tolist()}, {"stream_id": "cam", "T_wc": [[1]]},
                    {"stream_id": "cam", "T_wc": np.eye(4).tolist(), "size": [30, 30]}):
            reply, _ = c.request("query_raymap", **bad)
            assert not reply["ok"] and reply["error"]
        reply, _ = c.request("save_map", stream_id="cam", path="maps/today")
        assert reply["ok"] and all(f.startswith(str((tmp_path / "serve").resolve())) for f in reply["files"])
        # a client's exports go under exports/<its stream>/, never into another stream's folder
        assert len(read_tum(tmp_path / "serve" / "exports" / "cam" / "maps" / "today" / "trajectory.txt")[0]) == 3
        os.symlink("/tmp", tmp_path / "serve" / "exports" / "cam" / "sneaky")
        for escape in ("../outside", "/etc/x", "maps/../../x", "sneaky/x", "", "../../streams/cam2", "a//b",
                       "maps/today/trajectory.txt"):
            reply, _ = c.request("save_map", stream_id="cam", path=escape)
            assert not reply["ok"], escape
        assert not (tmp_path / "outside").exists()
        reply, _ = c.request("reset", stream_id="cam", keep_trajectory=False, clear_map=True)
        assert reply["ok"] and _stats(c)["streams"]["cam"]["map_points"] == 0
        reply, _ = c.request("frobnicate")
        assert not reply["ok"] and "unknown command" in reply["error"]
        c.ctl.send(b"\x00not json")
        assert not wire.decode_reply(c.ctl.recv_multipart())[0]["ok"]
        reply, _ = c.request("close_stream", stream_id="cam")
        assert reply["ok"] and "cam" not in _stats(c)["streams"]
        assert (tmp_path / "serve" / "streams" / "cam" / "map.ply").exists()
        reply, _ = c.request("shutdown")
        assert reply["ok"]
        assert wait_for(lambda: node._stop.is_set())
        pub.close()
        c.close()


def test_imagezmq_senders_feed_the_node(tmp_path):
    imagezmq = pytest.importorskip("imagezmq")
    import cv2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        pub_port = s.getsockname()[1]
    pub_sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{pub_port}", REQ_REP=False)
    with running_node(tmp_path, subscribe=[f"tcp://127.0.0.1:{pub_port}"]) as node:
        c = Client(node)
        sender = imagezmq.ImageSender(connect_to=node.endpoints["ingest"])  # REQ/REP, unmodified
        imgs = frames(4)
        for img in imgs[:2]:
            assert sender.send_image("jetson|cam 1", np.ascontiguousarray(img[..., ::-1])) == b"OK"
        for img in imgs[2:]:
            ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]))
            assert sender.send_jpg("jetson|cam 1", jpg) == b"OK"
        assert wait_for(lambda: (s := _stats(c)["streams"].get("jetson")) and s["processed"] + s["dropped"] == 4)
        # PUB/SUB mode: the sender binds, the node subscribes; resend until it arrives (slow joiner)
        assert wait_for(lambda: (pub_sender.send_image("roof", np.ascontiguousarray(imgs[0][..., ::-1])) or True)
                        and "roof" in _stats(c)["streams"], timeout=20)
        assert _stats(c)["streams"]["roof"]["errors"] == 0
        sender.close()
        c.close()
    pub_sender.close()


def test_ten_thousand_malformed_messages_then_a_valid_frame(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    valid_header = json.loads(wire.encode_frame(frames(1)[0], "fuzz", 0)[0])
    field_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                             st.text(max_size=20), st.lists(st.integers(), max_size=4))
    headers = st.one_of(
        st.binary(max_size=200),  # not JSON at all
        st.dictionaries(st.sampled_from(list(valid_header) + ["msg", "dtype", "shape", "x"]), field_values,
                        max_size=12).map(lambda d: json.dumps(d).encode()),
        st.sampled_from(sorted(valid_header)).flatmap(  # one valid field broken
            lambda k: field_values.map(lambda v: json.dumps({**valid_header, k: v}).encode())),
    )
    payloads = st.one_of(st.binary(max_size=300), st.integers(0, 9215).map(lambda n: b"\x7f" * n))
    messages = st.one_of(st.tuples(headers, payloads).map(list),
                         st.lists(st.binary(max_size=50), min_size=0, max_size=5).filter(lambda p: len(p) != 2))

    with running_node(tmp_path, max_streams=64) as node:
        c = Client(node)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.sndhwm = 0
        sock.connect(node.endpoints["ingest"])
        sent = {"n": 0}

        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(st.lists(messages, min_size=50, max_size=50))
        def send_batch(batch):
            for parts in batch:
                if not parts:
                    parts = [b""]
                sock.send_multipart(parts)
                sent["n"] += 1

        send_batch()
        assert sent["n"] >= 10_000

        def rejected():
            st_ = _stats(c)
            return st_["node"]["errors"] + sum(s["errors"] for s in st_["streams"].values())

        assert wait_for(lambda: _stats(c)["node"]["messages"] >= sent["n"], timeout=60)
        assert rejected() > 9_000  # almost all are invalid (a random message can be valid by chance)
        sock.send_multipart(wire.encode_frame(frames(1, seed=9)[0], "after-fuzz", 0))
        assert wait_for(lambda: (s := _stats(c)["streams"].get("after-fuzz")) and s["processed"] == 1)
        assert _stats(c)["node"]["internal_errors"] == 0
        sock.close(0)
        c.close()


def test_publisher_that_dies_and_returns_twenty_times(tmp_path):
    with running_node(tmp_path) as node:
        c = Client(node)
        seq = 0
        for life in range(20):
            pub = Publisher(node.endpoints["ingest"], "flaky", lossless=True)  # a new process: new session
            pub.seq = seq
            for img in frames(2, seed=life):
                pub.send(img)
            assert pub.flush(30), f"life {life}"
            seq = pub.seq
            pub.close()
        s = _stats(c)["streams"]["flaky"]
        assert s["processed"] == 40 and s["duplicates"] == 0 and s["errors"] == 0
        assert len(_stats(c)["streams"]) == 1
        # a resend of a frame still waiting gets one answer, when it is processed; a resend of a processed
        # frame (same session, same seq) is dropped as a duplicate
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(node.endpoints["ingest"])
        msg = wire.encode_frame(frames(1)[0], "flaky", 100, ack=True, lossless=True, session="abc")
        sock.send_multipart(msg)
        sock.send_multipart(msg)
        acks = [json.loads(sock.recv_multipart()[-1])["status"] for _ in range(2) if sock.poll(3000)]
        sock.send_multipart(msg)
        acks += [json.loads(sock.recv_multipart()[-1])["status"] for _ in range(1) if sock.poll(20000)]
        # the second copy came while the first waited (one answer) or after it was processed (duplicate)
        assert acks[0] == "processed" and acks[1:] in (["duplicate"], ["duplicate", "duplicate"])
        assert _stats(c)["streams"]["flaky"]["processed"] == 41
        sock.close(0)
        c.close()


def test_slow_subscriber_never_blocks_the_node(tmp_path):
    with running_node(tmp_path, geometry_stride=1) as node:
        stuck = zmq.Context.instance().socket(zmq.SUB)
        stuck.rcvhwm = 1
        stuck.setsockopt(zmq.SUBSCRIBE, b"")
        stuck.connect(node.endpoints["results"])  # connected, never reads
        c = Client(node)
        time.sleep(0.3)
        pub = Publisher(node.endpoints["ingest"], "busy", lossless=True, window=4)
        for img in frames(30):
            pub.send(img)
        assert pub.flush(60)  # every frame acknowledged as processed while the subscriber never read
        assert _stats(c)["streams"]["busy"]["processed"] == 30
        stuck.close(0)
        pub.close()
        c.close()


def test_stream_cap_and_idle_timeout(tmp_path):
    with running_node(tmp_path, max_streams=2, idle_timeout_s=1.0) as node:
        c = Client(node)
        time.sleep(0.3)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(node.endpoints["ingest"])
        for sid in ("a", "b", "c"):
            sock.send_multipart(wire.encode_frame(frames(1)[0], sid, 0))
        assert wait_for(lambda: _stats(c)["node"]["errors_by_kind"].get("too_many_streams") == 1)
        res = c.collect(lambda r: sum(1 for t, h, _ in r if t.endswith("/status") and h.get("closed")) == 2, timeout=20)
        closed = {h["stream_id"] for t, h, _ in res if t.endswith("/status") and h.get("closed")}
        assert closed == {"a", "b"} and _stats(c)["streams"] == {}
        assert len(read_tum(tmp_path / "serve" / "streams" / "a" / "trajectory.txt")[0]) == 1
        sock.close(0)
        c.close()


def test_curve_authentication(tmp_path):
    import zmq.auth

    keys = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    node_pub, node_sec = zmq.auth.create_certificates(keys, "node")
    good_pub, good_sec = zmq.auth.create_certificates(keys, "good")
    _, bad_sec = zmq.auth.create_certificates(keys, "bad")  # never allowed
    os.replace(good_pub, allowed / "good.key")
    with running_node(tmp_path, curve_secret_key=node_sec, curve_clients=str(allowed)) as node:
        good = Client(node, curve=(node_pub, good_sec))
        reply, _ = good.request("ping", timeout=10)
        assert reply is not None and reply["ok"]
        wrong = Client(node, curve=(node_pub, bad_sec))
        assert wrong.request("ping", timeout=1.5)[0] is None
        plain = Client(node)
        assert plain.request("ping", timeout=1.5)[0] is None
        pub = Publisher(node.endpoints["ingest"], "secure", lossless=True, curve=(node_pub, good_sec))
        pub.send(frames(1)[0])
        assert pub.flush(30)
        intruder = Publisher(node.endpoints["ingest"], "intruder", curve=(node_pub, bad_sec))
        intruder.send(frames(1)[0])
        time.sleep(1.0)
        streams = good.request("stats")[0]["streams"]
        assert "secure" in streams and "intruder" not in streams
        for x in (good, wrong, plain):
            x.close()
        pub.close()
        intruder.close()


def test_remote_bind_needs_an_explicit_flag(tmp_path, caplog):
    assert is_loopback_endpoint("tcp://127.0.0.1:5555") and is_loopback_endpoint("tcp://localhost:1")
    assert not is_loopback_endpoint("tcp://0.0.0.0:5555") and not is_loopback_endpoint("tcp://*:5555")
    with pytest.raises(ValueError, match="--allow-remote"):
        ServeConfig.of(ingest="tcp://0.0.0.0:0").validate()
    with caplog.at_level("WARNING"):
        with running_node(tmp_path, ingest="tcp://0.0.0.0:0", allow_remote=True):
            pass
    assert "WITHOUT authentication" in caplog.text


def test_results_subscriber_bridge_writes_trajectories(tmp_path):
    with running_node(tmp_path) as node:
        sub = ResultsSubscriber(node.endpoints["results"], streams=["cam"], kinds=("pose",))
        time.sleep(0.3)
        pub = Publisher(node.endpoints["ingest"], "cam", lossless=True)
        for img in frames(4):
            pub.send(img, stamp_ns=int(5e9) + 1000)
        assert pub.flush(30)
        got = [r for _, r in zip(range(4), sub.results(timeout_s=10))]
        assert [h["seq"] for _, _, h, _ in got] == [0, 1, 2, 3]
        files = sub.write_tum(tmp_path / "traj")
        stamps, T = read_tum(files[0])
        assert len(stamps) == 4 and np.isclose(stamps[0], 5.000001)
        sub.close()
        pub.close()


def test_camera_pub_cli_streams_a_real_clip(tmp_path, shared):
    from streamrecon_bridges import camera_pub

    with running_node(tmp_path, size=64) as node:
        c = Client(node)
        code = camera_pub.main([str(shared / "data" / "cut3r_examples" / "003"), "--connect", node.endpoints["ingest"],
                                "--stream-id", "statue", "--lossless", "--encoding", "jpeg"])
        assert code == 0
        assert _stats(c)["streams"]["statue"]["processed"] == 4
        c.close()
    ply = read_ply(tmp_path / "serve" / "streams" / "statue" / "map.ply")  # flushed at shutdown
    assert len(ply["x"]) > 0


def test_serve_cli_flushes_every_stream_on_sigterm(tmp_path, shared):
    import signal
    import subprocess
    import sys

    ingest, results, control = free_endpoints()
    out = tmp_path / "serve"
    proc = subprocess.Popen([sys.executable, "-m", "streamrecon", "serve", "--weights",
                             str(shared / "golden" / "tiny_dpt" / "checkpoint.pth"), "--size", "64", "--ingest", ingest,
                             "--results", results, "--control", control, "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "ingest tcp://127.0.0.1" in proc.stdout.readline()
        pubs = [Publisher(ingest, sid, lossless=True) for sid in ("left", "right")]
        for pub in pubs:
            for img in frames(3, seed=len(pub.stream_id)):
                pub.send(img)
        assert all(p.flush(60) for p in pubs)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    for sid in ("left", "right"):
        assert len(read_tum(out / "streams" / sid / "trajectory.txt")[0]) == 3
        assert (out / "streams" / sid / "map.ply").exists() and (out / "streams" / sid / "map.glb").exists()
        assert json.loads((out / "streams" / sid / "status.json").read_text())["processed"] == 3
    for pub in pubs:
        pub.close()


def test_snapshots_save_list_load_and_restore_after_a_restart(tmp_path):
    """``save_snapshot`` / ``list_snapshots`` / ``load_snapshot`` (names only, never paths), automatic
    snapshots every 3 frames, and ``--restore``: after a node restart the stream continues from its last
    snapshot (frame count and trajectory go on)."""
    with running_node(tmp_path, snapshot_every="3") as node:
        c = Client(node)
        pub = Publisher(node.endpoints["ingest"], "cam1", lossless=True)
        for img in frames(5):
            pub.send(img)
        assert pub.flush(30)
        reply, _ = c.request("save_snapshot", stream_id="cam1", name="five")
        assert reply["ok"] and reply["name"] == "five" and reply["frames"] == 5 and reply["bytes"] > 0
        for bad in ("../five", "/tmp/x", ".hidden", "a/b", 7):
            reply, _ = c.request("save_snapshot", stream_id="cam1", name=bad)
            assert not reply["ok"] and "name" in reply["error"], bad
        assert not list((tmp_path / "serve").glob("**/.tmp-*"))
        reply, _ = c.request("list_snapshots", stream_id="cam1")
        names = [r["name"] for r in reply["snapshots"]]
        assert reply["ok"] and "five" in names and any(n.startswith("snap-") and n.endswith("f00000003") for n in names)
        reply, _ = c.request("list_snapshots")
        assert reply["ok"] and list(reply["streams"]) == ["cam1"]
        # another stream starts from cam1's snapshot (map reuse); a bad name or stream is refused
        reply, _ = c.request("load_snapshot", stream_id="cam2", from_stream="cam1", name="five")
        assert reply["ok"] and reply["frames"] == 5 and _stats(c)["streams"]["cam2"]["processed"] == 5
        for bad in ({"stream_id": "cam2", "name": "missing"}, {"stream_id": "cam2", "from_stream": "../x"},
                    {"stream_id": "cam2", "name": "../../etc"}, {"name": "five"}):
            reply, _ = c.request("load_snapshot", **bad)
            assert not reply["ok"] and reply["error"], bad
        assert _stats(c)["streams"]["cam2"]["processed"] == 5  # a refused load leaves the stream as it was
        pub.close()
        c.close()
    # the node stopped: each stream wrote a last snapshot; a new node with --restore continues cam1
    _, T_before = read_tum(tmp_path / "serve" / "streams" / "cam1" / "trajectory.txt")
    with running_node(tmp_path, restore=True) as node:
        c = Client(node)
        pub = Publisher(node.endpoints["ingest"], "cam1", lossless=True)
        for img in frames(2, seed=1):
            pub.send(img)
        assert pub.flush(30)
        st = _stats(c)["streams"]["cam1"]
        assert st["processed"] == 7 and st["restored_from"].startswith("snap-"), st
        reply, _ = c.request("close_stream", stream_id="cam1")
        assert reply["ok"]
        _, T_after = read_tum(tmp_path / "serve" / "streams" / "cam1" / "trajectory.txt")
        assert len(T_after) == 7 and np.array_equal(T_after[:5], T_before)
        pub.close()
        c.close()
    # the restored stream's earlier files were set aside, not rewritten
    (previous,) = (tmp_path / "serve" / "previous").glob("cam1-*")
    assert np.array_equal(read_tum(previous / "trajectory.txt")[1], T_before)


def test_camera_pub_names_a_bad_stream_id_and_a_missing_node(tmp_path, shared, capsys):
    from streamrecon_bridges import camera_pub

    clip = str(shared / "data" / "cut3r_examples" / "003")
    assert camera_pub.main([clip, "--stream-id", "bad id/../x"]) == 2  # one line, no traceback, nothing sent
    err = capsys.readouterr().err
    assert "invalid --stream-id 'bad id/../x'" in err and "Traceback" not in err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = camera_pub.main([clip, "--stream-id", "cam", "--connect", f"tcp://127.0.0.1:{port}", "--lossless",
                            "--ack-timeout", "0.3", "--give-up-after", "1"])
    assert code == 1  # lossless and nothing acknowledged: a failure, not success
    assert "4 of 4 frames were never acknowledged" in capsys.readouterr().err
    # more frames than the window (4): the publisher gives up while sending, it does not wait forever
    code = camera_pub.main([str(shared / "data" / "cut3r_examples" / "lady-running.mp4"), "--stream-id", "cam",
                            "--connect", f"tcp://127.0.0.1:{port}", "--lossless", "--ack-timeout", "0.3",
                            "--give-up-after", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "no frame processed for 1 s" in err and "4 of 4 frames were never acknowledged" in err


def test_camera_pub_fails_when_the_node_rejects_its_frames(tmp_path, shared, capsys):
    from streamrecon_bridges import camera_pub

    with running_node(tmp_path, size=64, max_streams=1) as node:
        first = Publisher(node.endpoints["ingest"], "first", lossless=True)
        assert first.send(frames(1)[0]) and first.flush(30)  # the one stream the node takes
        code = camera_pub.main([str(shared / "data" / "cut3r_examples" / "003"), "--connect", node.endpoints["ingest"],
                                "--stream-id", "second", "--lossless"])
        first.close()
    assert code == 1 and "the node rejected 4 of 4 frames" in capsys.readouterr().err


def test_results_sub_writes_its_trajectories_on_sigterm(tmp_path):
    import signal
    import subprocess
    import sys

    import zmq

    from streamrecon import wire

    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    out = tmp_path / "traj"
    proc = subprocess.Popen([sys.executable, "-m", "streamrecon_bridges.results_sub", "--connect",
                             f"tcp://127.0.0.1:{port}", "--out-dir", str(out), "--quiet", "--flush-every", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sent = 0
        deadline = time.monotonic() + 60
        while sent < 200 and time.monotonic() < deadline:  # until the subscriber is surely connected
            T = np.eye(4)
            T[0, 3] = sent
            pub.send_multipart(wire.encode_result("cam", "pose", {"seq": sent, "stamp_ns": sent * 10**9,
                                                                  "T_wc": T.ravel().tolist(), "latency_ms": 1.0}))
            pub.send_multipart(wire.encode_result("../evil", "pose", {"seq": 0, "stamp_ns": 0, "T_wc": T.ravel().tolist(),
                                                                      "latency_ms": 1.0}))
            sent += 1
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        pub.close(linger=0)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stamps, poses = read_tum(out / "cam.txt")  # written although the process was terminated
    assert 0 < len(stamps) <= sent and np.allclose(poses[:, 0, 3], stamps)
    assert sorted(p.name for p in out.iterdir()) == ["cam.txt"] and not (tmp_path / "evil.txt").exists()
    assert "malformed messages skipped" in err


def test_a_new_stream_under_an_old_id_never_mixes_with_the_earlier_outputs(tmp_path):
    with running_node(tmp_path, lossless=True, save_frames=True) as node:
        c = Client(node)
        time.sleep(0.3)
        for n in (3, 2):  # a stream, closed, then a new one under the same id
            pub = Publisher(node.endpoints["ingest"], "cam", lossless=True, window=1)
            for i, img in enumerate(frames(n)):
                assert pub.send(img, stamp_ns=(i + 1) * 10**8)
            assert pub.flush(30)
            pub.close()
            reply, _ = c.request("close_stream", stream_id="cam")
            assert reply["ok"]
        c.close()
    now, previous = tmp_path / "serve" / "streams" / "cam", list((tmp_path / "serve" / "previous").iterdir())
    assert len(previous) == 1 and previous[0].name.startswith("cam-")
    assert len(read_tum(now / "trajectory.txt")[0]) == 2 and len(list((now / "frames").iterdir())) == 2
    assert len(read_tum(previous[0] / "trajectory.txt")[0]) == 3 and len(list((previous[0] / "frames").iterdir())) == 3


def test_results_sub_skips_the_node_heartbeat_without_calling_it_malformed():
    import zmq

    from streamrecon import wire

    pub = zmq.Context.instance().socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = ResultsSubscriber(f"tcp://127.0.0.1:{port}")
    try:
        got = []
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:  # until the subscription is live
            pub.send_multipart([b"_node/status", *wire.encode_result("_node", "status", {"streams": {}})[1:]])
            pub.send_multipart(wire.encode_result("cam", "pose", {"seq": 0, "stamp_ns": 0,
                                                                  "T_wc": np.eye(4).ravel().tolist(), "latency_ms": 1.0}))
            got = [r for r in sub.results(timeout_s=0.2)]
        assert got and {(sid, kind) for sid, kind, _, _ in got} == {("cam", "pose")} and sub.errors == 0
    finally:
        sub.close()
        pub.close(linger=0)
