"""Regression tests of the node's hardening (issue 17): each reproduces an attack or a failure that
once worked -- paths out of the output directory, memory bombs, ZeroMQ limits, lossless frames lost,
hangs -- and checks that it no longer does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import zmq

from streamrecon import wire
from streamrecon.fileio import UnsafePathError, confine
from streamrecon.mapping import read_ply, read_tum
from streamrecon.server import Node, ServeConfig
from streamrecon.settings import SettingsError
from streamrecon_bridges.camera_pub import Publisher

from .node_helpers import Client, frames, running_node, tiny_model, wait_for


def _stats(client):
    reply, _ = client.request("stats")
    return reply


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _dealer(node: Node) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(node.endpoints["ingest"])
    return sock


def _acks(sock, n: int, timeout_s: float = 20.0) -> list[dict]:
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if sock.poll(100):
            out.append(json.loads(sock.recv_multipart()[-1]))
    return out


def _files_under(path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.exists() else []


# ---------------------------------------------------------------------------------------------- paths


def test_confine_follows_symlinks_and_refuses_what_leaves_the_root(tmp_path):
    root, outside = tmp_path / "out", tmp_path / "outside"
    (root / "streams").mkdir(parents=True)
    outside.mkdir()
    assert confine(root, root / "streams" / "cam" / "map.ply") == root / "streams" / "cam" / "map.ply"
    os.symlink(outside, root / "streams" / "evil")
    os.symlink(root / "streams" / "loop", root / "streams" / "loop")  # a symlink loop
    for bad in (root / "streams" / "evil" / "map.ply", root / ".." / "x", "/etc/passwd", root / "streams/../../x",
                root / "streams" / "loop" / "x"):
        with pytest.raises(UnsafePathError):
            confine(root, bad)
    assert issubclass(UnsafePathError, OSError)  # every place that reports a failed write reports this one


def test_a_relative_output_dir_is_written_where_it_says(tmp_path, monkeypatch):
    from streamrecon.sinks.files import FileSink

    monkeypatch.chdir(tmp_path)
    assert confine("out", "out/streams/cam/map.ply") == Path("out/streams/cam/map.ply")
    sink = FileSink("out/run")
    sink.write_summary({"processed": 0})
    assert (tmp_path / "out" / "run" / "summary.json").is_file() and not (tmp_path / "out" / "run" / "out").exists()


def test_probe_camera_names_are_names_and_never_leave_probes(tmp_path):
    from streamrecon.frames import ProbeResult
    from streamrecon.probe import parse_probe
    from streamrecon.sinks.files import FileSink

    cams = tmp_path / "cams.json"
    cams.write_text(json.dumps([{"name": "../../outside/x", "T_wc": np.eye(4).tolist()}]))
    with pytest.raises(ValueError, match="name"):
        parse_probe(str(cams))
    out = tmp_path / "run"
    sink = FileSink(out)  # a name from elsewhere (a control request): sanitised inside probes/
    z = np.zeros((16, 16, 3), np.float32)
    sink.on_probe(ProbeResult(name="../../outside/x", frame_index=3, T_wc=np.eye(4), K=np.eye(3), points_cam=z,
                              points_world=z, conf=z[..., 0], rgb=np.zeros((16, 16, 3), np.uint8),
                              pose_estimate=np.eye(4)))
    assert not (tmp_path / "outside").exists()
    assert all(p.startswith(str(out / "probes")) for p in _files_under(out))


def test_a_symlink_planted_under_streams_never_carries_a_write_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "serve" / "streams").mkdir(parents=True)
    os.symlink(outside, tmp_path / "serve" / "streams" / "cam1")  # planted before the stream opens
    with running_node(tmp_path, lossless=True, idle_timeout_s=0.5) as node:
        c = Client(node)
        sock = _dealer(node)
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam1", 0, ack=True))
        (ack,) = _acks(sock, 1)
        assert ack["status"] == "rejected" and "cam1" not in _stats(c)["streams"]
        assert _stats(c)["node"]["errors_by_kind"]["unsafe_path"] == 1
        # planted while a stream is open: its folder is swapped for a link out, then it closes (idle)
        for i, img in enumerate(frames(2)):
            sock.send_multipart(wire.encode_frame(img, "cam2", i, ack=True))
        assert [a["status"] for a in _acks(sock, 2)] == ["processed", "processed"]
        d = tmp_path / "serve" / "streams" / "cam2"
        shutil.move(str(d), str(tmp_path / "moved"))
        os.symlink(outside, d)
        assert wait_for(lambda: "cam2" not in _stats(c)["streams"], timeout=20)
        # and a snapshot root planted the same way
        (tmp_path / "serve" / "snapshots").mkdir(exist_ok=True)
        os.symlink(outside, tmp_path / "serve" / "snapshots" / "cam3")
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam3", 0, ack=True))
        assert _acks(sock, 1)[0]["status"] == "rejected"
        assert _stats(c)["node"]["internal_errors"] == 0
        sock.close()
        c.close()
    assert _files_under(outside) == []


def test_save_map_writes_only_into_the_stream_own_exports(tmp_path):
    with running_node(tmp_path, lossless=True) as node:
        c = Client(node)
        sock = _dealer(node)
        for sid in ("cam", "other"):
            sock.send_multipart(wire.encode_frame(frames(1)[0], sid, 0, ack=True))
        assert len(_acks(sock, 2)) == 2
        for path in ("../../streams/other", "../other/map.ply", "../../streams/other/map.ply"):
            reply, _ = c.request("save_map", stream_id="cam", path=path)
            assert not reply["ok"], path
        reply, _ = c.request("save_map", stream_id="cam", path="snap/map.ply")  # a folder of its own exports
        assert reply["ok"] and all("/exports/cam/snap/map.ply/" in f for f in reply["files"])
        reply, _ = c.request("save_map", stream_id="cam")  # no path: the exports folder, not the live one
        assert reply["ok"] and all(f.startswith(str(tmp_path / "serve" / "exports" / "cam") + "/") for f in reply["files"])
        for i, img in enumerate(frames(3)[1:]):  # the stream's own trajectory goes on (it was not replaced)
            sock.send_multipart(wire.encode_frame(img, "cam", i + 1, ack=True))
        assert len(_acks(sock, 2)) == 2
        for sid in ("other", "cam"):
            reply, _ = c.request("close_stream", stream_id=sid)
            assert reply["ok"]
        sock.close()
        c.close()
    streams = tmp_path / "serve" / "streams"
    assert len(read_tum(streams / "cam" / "trajectory.txt")[0]) == 3
    assert len(read_tum(tmp_path / "serve" / "exports" / "cam" / "trajectory.txt")[0]) == 1
    assert (streams / "other" / "map.ply").is_file() and len(read_ply(streams / "other" / "map.ply")["x"]) >= 0


def test_serve_with_a_relative_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with running_node(tmp_path, lossless=True, output_dir="rel") as node:
        sock = _dealer(node)
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam", 0, ack=True))
        assert _acks(sock, 1)[0]["status"] == "processed"
        sock.close()
    assert len(read_tum(tmp_path / "rel" / "streams" / "cam" / "trajectory.txt")[0]) == 1
    assert not (tmp_path / "rel" / "rel").exists()


# ---------------------------------------------------------------------------------------------- ZeroMQ limits


def test_an_oversized_part_never_reaches_the_decoder(tmp_path):
    """MAXMSGSIZE is set before bind: ZeroMQ drops the connection, the node never reads the part."""
    with running_node(tmp_path, max_message_bytes=1 << 20) as node:
        c = Client(node)
        big = _dealer(node)
        big.send_multipart([json.dumps({"v": 1}).encode(), b"\0" * (2 << 20)])
        time.sleep(1.0)
        stats = _stats(c)["node"]
        assert stats["messages"] == 0 and stats["errors"] == 0  # dropped by ZeroMQ, not counted by us
        ok = _dealer(node)
        ok.send_multipart(wire.encode_frame(frames(1)[0], "cam", 0, ack=True, lossless=True))
        assert _acks(ok, 1)[0]["status"] == "processed"
        ctl = zmq.Context.instance().socket(zmq.DEALER)
        ctl.linger = 0
        ctl.connect(node.endpoints["control"])
        ctl.send_multipart([b"{" + b" " * (2 << 20) + b"}"])  # over the control limit (1 MiB)
        assert not ctl.poll(1000)
        assert _stats(c)["node"]["control_errors"] == 0
        for s in (big, ok, ctl):
            s.close()
        c.close()


# ---------------------------------------------------------------------------------------------- bombs


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width x height`` RGB, followed by a few bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + \
        chunk(b"IEND", b"")


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 is patched to declare ``width x height``."""
    import cv2

    jpg = bytearray(cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    i = jpg.find(b"\xff\xc0")
    jpg[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(jpg)


@pytest.mark.parametrize("encoding,payload", [("png", _png_header_only(16384, 16384)),
                                              ("png", _png_header_only(6000, 5000)),
                                              ("jpeg", _jpeg_with_size(16000, 16000)),
                                              ("jpeg", _jpeg_with_size(65000, 65000))],
                         ids=["png-16384x16384", "png-6000x5000", "jpeg-16000x16000", "jpeg-65000x65000"])
def test_a_decompression_bomb_is_refused_from_its_header(encoding, payload):
    header = json.dumps({"v": 1, "stream_id": "cam", "seq": 4, "encoding": encoding}).encode()
    tracemalloc.start()
    try:
        with pytest.raises(wire.WireError) as e:
            wire.decode_frame([header, payload], max_frame_bytes=64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.kind == "too_large" and e.value.stream_id == "cam" and e.value.seq == 4
    assert peak < 4 << 20  # nothing the size of the image was allocated
    zmq_header = json.dumps({"msg": "cam"}).encode()  # imagezmq send_jpg takes the same check
    with pytest.raises(wire.WireError, match="too_large"):
        wire.decode_frame([zmq_header, payload])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_an_exif_orientation_is_not_applied_frames_are_read_as_stored(fmt):
    import io

    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 to show it": the stored image is 64 wide, 32 high
    buf = io.BytesIO()
    img.save(buf, fmt, exif=exif.tobytes())
    enc = fmt.lower()
    assert wire.compressed_size(buf.getvalue(), enc) == (64, 32)
    header = {"v": 1, "stream_id": "cam", "seq": 0, "encoding": enc, "width": 64, "height": 32}
    assert wire.decode_frame([json.dumps(header).encode(), buf.getvalue()]).image().shape == (32, 64, 3)


def test_compressed_frames_must_be_what_they_say():
    import cv2

    tiff = cv2.imencode(".tiff", np.zeros((8, 8, 3), np.uint8))[1].tobytes()  # OpenCV would decode it
    header = json.dumps({"v": 1, "stream_id": "cam", "seq": 0, "encoding": "jpeg"}).encode()
    with pytest.raises(wire.WireError, match="undecodable"):
        wire.decode_frame([header, tiff])
    with pytest.raises(wire.WireError, match="undecodable"):
        wire.decode_frame([json.dumps({"msg": "cam"}).encode(), tiff])


def test_junk_frames_never_open_streams(tmp_path):
    with running_node(tmp_path, max_streams=2) as node:
        c = Client(node)
        sock = _dealer(node)
        good = wire.encode_frame(frames(1)[0], "x", 0, encoding="jpeg")[1]
        junk = good[: good.find(b"\xff\xda") + 20]  # a JPEG header and no image
        for i in range(16):
            sock.send_multipart([json.dumps({"v": 1, "stream_id": f"junk{i}", "seq": 0, "encoding": "jpeg",
                                             "ack": True}).encode(), junk])
        assert [a["status"] for a in _acks(sock, 16)] == ["rejected"] * 16
        assert _stats(c)["streams"] == {} and _stats(c)["node"]["errors_by_kind"]["undecodable"] == 16
        for sid in ("real1", "real2"):
            sock.send_multipart(wire.encode_frame(frames(1)[0], sid, 0, ack=True, lossless=True))
        assert [a["status"] for a in _acks(sock, 2)] == ["processed", "processed"]
        sock.close()
        c.close()


def test_a_stream_id_with_a_trailing_newline_is_not_a_stream_id():
    from streamrecon.snapshot import valid_name

    assert not wire.valid_stream_id("cam1\n") and not wire.valid_stream_id("cam1\r\n") and wire.valid_stream_id("cam1")
    assert not valid_name("snap\n")
    header = json.dumps({"v": 1, "stream_id": "cam1\n", "seq": 0, "encoding": "mono8", "width": 1, "height": 1})
    with pytest.raises(wire.WireError, match="bad_stream_id"):
        wire.decode_frame([header.encode(), b"\0"])
    with pytest.raises(wire.WireError, match="bad_stream_id"):
        wire.stream_id_from_imagezmq("cam\n1|frame 3")  # imagezmq's msg is trimmed; inside, a newline is refused


# ---------------------------------------------------------------------------------------------- lossless delivery


def test_a_frame_refused_as_busy_is_processed_when_sent_again(tmp_path):
    """The queue holds 2 frames and the publisher keeps 16 in flight: many are refused as busy; each is
    sent again and processed, in order -- none is mistaken for a duplicate."""
    with running_node(tmp_path, lossless_queue=2) as node:
        c = Client(node)
        pub = Publisher(node.endpoints["ingest"], "busy", lossless=True, window=16, ack_timeout=5.0)
        for i, img in enumerate(frames(40)):
            pub.send(img, stamp_ns=(i + 1) * 10**9)
        assert pub.flush(60)
        s = _stats(c)["streams"]["busy"]
        assert s["processed"] == 40 and s["busy"] > 0 and s["duplicates"] >= 0 and s["errors"] == 0
        assert pub.acked == 40 and pub.rejected == 0
        reply, _ = c.request("close_stream", stream_id="busy")
        stamps, _ = read_tum(tmp_path / "serve" / "streams" / "busy" / "trajectory.txt")
        assert np.array_equal(stamps, np.arange(1, 41))  # every frame, in order
        pub.close()
        c.close()


def test_shutdown_processes_every_accepted_lossless_frame(tmp_path):
    with running_node(tmp_path, lossless=True) as node:
        sock = _dealer(node)
        for i, img in enumerate(frames(30)):
            sock.send_multipart(wire.encode_frame(img, "cam", i, ack=True, session="s1"))
        time.sleep(0.05)
        node.stop()
        acks = _acks(sock, 30, timeout_s=30)
    statuses = {a["seq"]: a["status"] for a in acks}
    assert "dropped" not in statuses.values()
    done = sorted(q for q, st in statuses.items() if st == "processed")
    stamps, _ = read_tum(tmp_path / "serve" / "streams" / "cam" / "trajectory.txt")
    assert len(stamps) == len(done) > 0  # processed = what the node said it processed
    assert set(statuses.values()) <= {"processed", "busy"}  # the rest were refused (to be resent), not lost
    sock.close()


def test_no_lossless_frame_is_lost_across_a_node_restart(tmp_path):
    ingest, results, control = (f"tcp://127.0.0.1:{p}" for p in _free_ports(3))
    cfg = dict(ingest=ingest, results=results, control=control, size=64, output_dir=str(tmp_path / "serve"))
    n = 65
    imgs = frames(n)
    pub = Publisher(ingest, "cam", lossless=True, window=8, ack_timeout=1.0)
    pub.give_up_s = 60
    sent = 0
    for life in range(2):
        node = Node(ServeConfig.of(**cfg), model=tiny_model())
        import threading

        t = threading.Thread(target=node.serve_forever, daemon=True)
        t.start()
        stop_at = 30 if life == 0 else n
        while sent < stop_at:
            pub.send(imgs[sent], stamp_ns=(sent + 1) * 10**9)
            sent += 1
        if life == 1:
            assert pub.flush(60)
        node.stop()
        t.join(60)
    runs = [tmp_path / "serve" / "streams" / "cam"] + sorted((tmp_path / "serve" / "previous").iterdir())
    seen = np.concatenate([read_tum(d / "trajectory.txt")[0] for d in runs])
    assert set(np.round(seen).astype(int)) == set(range(1, n + 1))  # every frame, across both nodes
    assert pub.acked == n and pub.rejected == 0
    pub.close()


def test_a_req_sender_waiting_on_a_stream_that_turns_live_hears_back(tmp_path):
    """No loop thread: the test drives the node's ingest by hand, so the REQ frame is still waiting."""
    cfg = ServeConfig.of(ingest="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0",
                         size=64, output_dir=str(tmp_path / "serve"))
    node = Node(cfg, model=tiny_model())
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.linger = 0
    req.connect(node.endpoints["ingest"])
    try:
        req.send_multipart(wire.encode_frame(frames(1)[0], "cam", 0))  # a REQ peer: lossless by default
        assert wait_for(lambda: node.ingest.poll(0), timeout=5)
        node._drain_ingest(node.ingest, router=True)
        assert node.sessions["cam"].lossless and len(node.sessions["cam"].queue) == 1
        dealer = _dealer(node)
        dealer.send_multipart(wire.encode_frame(frames(2)[1], "cam", 1, lossless=False))  # another client flips it
        assert wait_for(lambda: node.ingest.poll(0), timeout=5)
        node._drain_ingest(node.ingest, router=True)
        assert req.poll(5000), "the REQ sender was left waiting"
        assert json.loads(req.recv_multipart()[-1])["status"] == "dropped"
        dealer.close()
    finally:
        req.close()
        node.close()


def _manual_node(tmp_path, **overrides) -> Node:
    """A node whose loop the test drives by hand (no thread): deterministic interleavings."""
    cfg = dict(ingest="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", size=64,
               output_dir=str(tmp_path / "serve"))
    cfg.update(overrides)
    return Node(ServeConfig.of(**cfg), model=tiny_model())


def _pump(node: Node) -> None:
    assert wait_for(lambda: node.ingest.poll(0), timeout=5)
    node._drain_ingest(node.ingest, router=True)


def test_a_frame_dropped_by_a_switch_to_live_is_taken_when_sent_again(tmp_path):
    node = _manual_node(tmp_path)
    try:
        sock = _dealer(node)
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam", 5, ack=True, lossless=True, session="p1"))
        _pump(node)
        flip = _dealer(node)
        flip.send_multipart(wire.encode_frame(frames(1)[0], "cam", 0, lossless=False, session="p2"))
        _pump(node)
        assert _acks(sock, 1)[0]["status"] == "dropped"
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam", 5, ack=True, lossless=True, session="p1"))
        _pump(node)
        while node.sessions["cam"].queue:  # the other client's frame, then this one
            node._step_ready()
        assert [a["status"] for a in _acks(sock, 1)] == ["processed"]  # not "duplicate": it was never processed
        for s in (sock, flip):
            s.close()
    finally:
        node.close()


def test_a_sender_that_does_not_hear_busy_holds_nothing_back(tmp_path):
    node = _manual_node(tmp_path, lossless=True, lossless_queue=1)
    try:
        sock = _dealer(node)
        for seq in (0, 1):  # no acks asked: the second is refused silently (the queue holds one)
            sock.send_multipart(wire.encode_frame(frames(1)[0], "cam", seq, session="p"))
            _pump(node)
        node._step_ready()
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam", 2, session="p"))
        _pump(node)
        s = node.sessions["cam"]
        assert s.busy == 1 and [p.msg.seq for p in s.queue] == [2]
        sock.close()
    finally:
        node.close()


def test_a_req_sender_whose_frame_waits_in_the_socket_at_shutdown_hears_back(tmp_path):
    node = _manual_node(tmp_path)
    req = zmq.Context.instance().socket(zmq.REQ)
    req.linger = 0
    req.connect(node.endpoints["ingest"])
    req.send_multipart(wire.encode_frame(frames(1)[0], "cam", 0))
    assert wait_for(lambda: node.ingest.poll(0), timeout=5)
    node.stop()
    node.close()  # the loop never read the frame: shutdown answers it
    assert req.poll(5000), "the REQ sender was left waiting"
    assert json.loads(req.recv_multipart()[-1])["status"] == "busy"
    req.close()


def test_a_stream_that_pauses_is_still_flushed(tmp_path):
    from streamrecon.engine import EngineConfig, StreamEngine
    from streamrecon.frames import Frame
    from streamrecon.mapping import GlobalMap, MapConfig
    from streamrecon.pipeline import StreamPipeline
    from streamrecon.pipeline.pipeline import PipelineOptions
    from streamrecon.sinks.base import BackgroundSink
    from streamrecon.sinks.files import FileSink

    pipe = StreamPipeline(StreamEngine(tiny_model(), EngineConfig(size=64)), GlobalMap(MapConfig(conf_thresh=0.0)),
                          [BackgroundSink(FileSink(tmp_path, flush_every=0))],
                          PipelineOptions(flush_every=0, flush_every_s=0.2, map_every_s=0.2))
    for i, img in enumerate(frames(2)):
        pipe.push(Frame(image=img, seq=i, stamp=float(i)))
    assert not pipe.flush_if_due() or True  # maybe due already on a slow machine
    time.sleep(0.25)
    pipe.flush_if_due()  # no frame comes: the pipeline flushes on its own (serve's housekeeping calls this)
    assert wait_for(lambda: (tmp_path / "summary.json").exists() and (tmp_path / "map.ply").exists())
    assert json.loads((tmp_path / "summary.json").read_text())["processed"] == 2
    assert len(read_tum(tmp_path / "trajectory.txt")[0]) == 2  # fsynced, though no frame came after
    assert not pipe.flush_if_due()  # nothing new since: nothing to write
    pipe.close()


def test_a_dealer_hears_why_its_frame_was_rejected(tmp_path):
    with running_node(tmp_path) as node:
        sock = _dealer(node)
        sock.send_multipart([json.dumps({"v": 1, "stream_id": "cam", "seq": 7, "encoding": "yuv", "ack": True}).encode(),
                             b"\0"])
        sock.send_multipart([b"\xff not json", b"\0"])
        acks = _acks(sock, 2)
        assert acks[0] == {"v": 1, "status": "rejected", "stream_id": "cam", "seq": 7, "error": acks[0]["error"]}
        assert "unknown_encoding" in acks[0]["error"] and acks[1]["status"] == "rejected" and "bad_json" in acks[1]["error"]
        sock.close()


def test_camera_pub_gives_up_on_a_node_that_never_answers(tmp_path, shared):
    from streamrecon_bridges.camera_pub import main as pub_main

    (port,) = _free_ports(1)
    t0 = time.monotonic()
    code = pub_main([str(shared / "data/cut3r_examples/003"), "--stream-id", "cam", "--lossless",
                     "--connect", f"tcp://127.0.0.1:{port}", "--ack-timeout", "0.2", "--give-up-after", "1"])
    assert code == 1 and time.monotonic() - t0 < 60


def test_imagezmq_req_rep_on_a_default_node_loses_nothing(tmp_path):
    imagezmq = pytest.importorskip("imagezmq")
    with running_node(tmp_path) as node:  # a live node: REQ peers are lossless anyway (one frame in flight)
        c = Client(node)
        sender = imagezmq.ImageSender(connect_to=node.endpoints["ingest"])
        for img in frames(30):
            assert sender.send_image("rpi", np.ascontiguousarray(img[..., ::-1])) == b"OK"
        s = _stats(c)["streams"]["rpi"]
        assert s["processed"] == 30 and s["dropped"] == 0 and s["mode"] == "lossless"
        sender.close()
        c.close()


# ---------------------------------------------------------------------------------------------- kills, failures


def test_a_killed_serve_leaves_each_stream_outputs(tmp_path, shared):
    ingest, results, control = (f"tcp://127.0.0.1:{p}" for p in _free_ports(3))
    out = tmp_path / "serve"
    proc = subprocess.Popen([sys.executable, "-m", "streamrecon", "serve", "--weights",
                             str(shared / "golden" / "tiny_dpt" / "checkpoint.pth"), "--size", "64", "--ingest", ingest,
                             "--results", results, "--control", control, "--output-dir", str(out),
                             "--flush-every-s", "0.2", "--map-every-s", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "ingest tcp://127.0.0.1" in proc.stdout.readline()
        pub = Publisher(ingest, "cam", lossless=True)
        for i, img in enumerate(frames(6)):
            pub.send(img, stamp_ns=(i + 1) * 10**9)
        assert pub.flush(60)
        time.sleep(0.4)
        pub.send(frames(7)[6], stamp_ns=7 * 10**9)  # one more frame: the periodic flush comes with a frame
        assert pub.flush(60)
        summary = out / "streams" / "cam" / "summary.json"
        assert wait_for(lambda: summary.exists() and json.loads(summary.read_text())["processed"] == 7, timeout=20)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        pub.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    d = out / "streams" / "cam"
    s = json.loads((d / "summary.json").read_text())
    assert s["in_progress"] is True and s["stop_reason"] == "running"
    assert len(read_tum(d / "trajectory.txt")[0]) == 7
    assert len(read_ply(d / "map.ply")["x"]) > 0


def test_a_failed_write_at_idle_close_is_counted_and_the_node_serves_on(tmp_path):
    with running_node(tmp_path, lossless=True, idle_timeout_s=0.5) as node:
        c = Client(node)
        sock = _dealer(node)
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam", 0, ack=True))
        assert _acks(sock, 1)[0]["status"] == "processed"
        d = tmp_path / "serve" / "streams"
        d.rename(tmp_path / "gone")  # (atomic: the stream's file sink may be writing)
        d.write_text("the directory above is now a file")
        assert wait_for(lambda: "cam" not in _stats(c)["streams"], timeout=20)
        d.unlink()
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam2", 0, ack=True))
        assert _acks(sock, 1)[0]["status"] == "processed"

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        node.sessions["cam2"].pipeline.close = disk_full  # whatever fails while an idle stream closes
        assert wait_for(lambda: "cam2" not in _stats(c)["streams"], timeout=20)
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam3", 0, ack=True))
        assert _acks(sock, 1)[0]["status"] == "processed"  # the node serves on
        stats = _stats(c)["node"]
        assert stats["close_errors"] == 1 and stats["internal_errors"] == 0
        sock.close()
        c.close()


def test_query_raymap_is_bounded_by_a_pixel_budget(tmp_path):
    with running_node(tmp_path, lossless=True, max_probe_pixels=64 * 64) as node:
        c = Client(node)
        sock = _dealer(node)
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam", 0, ack=True))
        assert _acks(sock, 1)[0]["status"] == "processed"
        reply, _ = c.request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist(), size=[2048, 2048])
        assert not reply["ok"] and "budget" in reply["error"]
        reply, arrays = c.request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist(), size=[64, 64])
        assert reply["ok"] and arrays["rgb"].shape == (64, 64, 3)
        reply, _ = c.request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist(), size=[64, 64], name="../x")
        assert not reply["ok"] and "name" in reply["error"]
        sock.close()
        c.close()


def test_a_probe_runs_off_the_frame_loop(tmp_path):
    """While a probe is being computed, every stream goes on: the test holds the probe's work back and
    frames are processed meanwhile; the reply comes when the work is done."""
    import threading

    with running_node(tmp_path, lossless=True) as node:
        c = Client(node)
        sock = _dealer(node)
        sock.send_multipart(wire.encode_frame(frames(1)[0], "cam", 0, ack=True))
        assert _acks(sock, 1)[0]["status"] == "processed"
        gate, pipe = threading.Event(), node.sessions["cam"].pipeline
        original = pipe.probe_later

        def held(*args, **kwargs):
            compute = original(*args, **kwargs)
            return lambda: (gate.wait(30), compute())[1]

        pipe.probe_later = held
        c.ctl.send_multipart(wire.encode_request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist()))
        for i, img in enumerate(frames(3)):  # both streams go on while the probe waits
            sock.send_multipart(wire.encode_frame(img, "cam" if i % 2 else "other", i + 1, ack=True))
        assert [a["status"] for a in _acks(sock, 3)] == ["processed"] * 3
        assert not c.ctl.poll(200)  # no reply yet: the probe is still being computed
        gate.set()
        assert c.ctl.poll(20000)
        reply, arrays = wire.decode_reply(c.ctl.recv_multipart())
        assert reply["ok"] and arrays["rgb"].ndim == 3
        sock.close()
        c.close()


# ---------------------------------------------------------------------------------------------- settings, viewer


def test_settings_that_would_silently_fail_are_errors(tmp_path):
    base = dict(ingest="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0")
    key = tmp_path / "node.key_secret"
    key.write_text("x")
    with pytest.raises(SettingsError, match="no such directory"):
        ServeConfig.of(**base, curve_secret_key=str(key), curve_clients=str(tmp_path / "missing")).validate()
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingsError, match="no .key file"):
        ServeConfig.of(**base, curve_secret_key=str(key), curve_clients=str(tmp_path / "empty")).validate()
    with pytest.raises(SettingsError, match="conf-thresh"):
        ServeConfig.of(**base, conf_thresh=float("nan")).validate()


def test_the_web_viewer_leaves_no_process_behind(tmp_path):
    from streamrecon.sinks.rerun_sink import RerunConfig, RerunRecording

    web, grpc = _free_ports(2)
    rec = RerunRecording(RerunConfig(viewer="web", web_port=web, grpc_port=grpc))
    pgid = rec.viewer_pid
    assert pgid is not None
    assert wait_for(lambda: len(_running_in_group(pgid)) == 2, timeout=10)  # `python -m rerun` and the binary
    rec.close()
    assert wait_for(lambda: _running_in_group(pgid) == [], timeout=10)  # neither is left (zombies aside)


def _running_in_group(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that have not exited (``/proc``; zombies left out: a
    container's init may never reap them)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out
