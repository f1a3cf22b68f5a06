"""``streamrecon serve --ray``: the gateway and its worker actors on a local Ray instance started here.

Ray runs with 4 logical CPUs, no dashboard, and is shut down at the end of the module; every socket of
ours is on 127.0.0.1. Each test starts its own gateway and workers (a worker imports torch and loads
the tiny golden model: a few seconds).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Iterator

import numpy as np
import pytest
import zmq

from streamrecon import wire
from streamrecon.cluster import ClusterSettings
from streamrecon.server import ServeConfig
from streamrecon.settings import SettingsError

from .conftest import SHARED
from .node_helpers import Client, frames, free_endpoints, poses, running_node, wait_for

ray = pytest.importorskip("ray")  # streamrecon[ray] is part of [dev]: CI has it

WEIGHTS = str(SHARED / "golden" / "tiny_dpt" / "checkpoint.pth")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False,
             object_store_memory=200 * 2**20)
    yield
    ray.shutdown()


@contextlib.contextmanager
def running_gateway(tmp_path, workers: int = 2, cluster: dict | None = None, **overrides) -> Iterator:
    from streamrecon.cluster import Gateway

    cfg = dict(ingest="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", size=64,
               output_dir=str(tmp_path / "serve"), status_interval_s=0.2, weights=WEIGHTS)
    cfg.update(overrides)
    gw = Gateway(ServeConfig.of(**cfg), ClusterSettings(ray_workers=workers, **(cluster or {})))
    thread = threading.Thread(target=gw.serve_forever, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: all(w.state == "ready" for w in gw.workers.values()), 180), "workers did not start"
        yield gw
    finally:
        gw.stop()
        thread.join(120)
        assert not thread.is_alive(), "gateway did not stop"


def _stats(c: Client) -> dict:
    reply, _ = c.request("stats")
    assert reply is not None and reply["ok"], reply
    return reply


def _dealer(gw):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(gw.endpoints["ingest"])
    return sock


def _acks(sock, n: int, timeout: float = 60.0) -> list[dict]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        if sock.poll(100):
            got.append(json.loads(sock.recv_multipart()[-1]))
    return got


def _send_round_robin(sock, streams: int, n: int, **kw) -> None:
    for i in range(n):  # all queued at once, so a worker can batch its streams
        for k in range(streams):
            sock.send_multipart(wire.encode_frame(frames(n, seed=k)[i], f"s{k}", i, **kw))


def test_placement_affinity_and_batched_results_equal_the_single_node_one_by_one(tmp_path):
    with running_gateway(tmp_path / "gw", workers=2, cluster={"ray_streams_per_worker": 2}, lossless=True) as gw:
        c = Client(gw)
        time.sleep(0.3)
        sock = _dealer(gw)
        _send_round_robin(sock, 4, 6)
        res = c.collect(lambda r: len(poses(r)) == 24, timeout=120)
        st = _stats(c)
        # a fifth stream finds both workers full (2 x 2) and is refused, named
        sock.send_multipart(wire.encode_frame(frames(1)[0], "s4", 0, ack=True))
        refused = _acks(sock, 1)
        after = _stats(c)["node"]
        c.close()
        sock.close(0)
    workers = {w["name"]: w for w in st["node"]["workers"]}
    assert sorted(len(w["streams"]) for w in workers.values()) == [2, 2]  # least loaded: two each
    assert sum(w["batched_calls"] for w in workers.values()) > 0
    for sid, s in st["streams"].items():  # affinity: each stream stayed on its worker
        assert sid in workers[s["worker"]]["streams"] and s["cluster"]["failovers"] == 0 and s["processed"] == 6
    assert refused and refused[0]["status"] == "rejected" and "no worker has room" in refused[0]["error"]
    assert after["errors_by_kind"]["no_worker_room"] == 1 and after["streams"] == 4
    cluster = {(p["stream_id"], p["seq"]): np.asarray(p["T_wc"]) for p in poses(res)}

    with running_node(tmp_path / "single", max_batch=1, lossless=True) as node:
        c = Client(node)
        time.sleep(0.3)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(node.endpoints["ingest"])
        _send_round_robin(sock, 4, 6)
        single = {(p["stream_id"], p["seq"]): np.asarray(p["T_wc"])
                  for p in poses(c.collect(lambda r: len(poses(r)) == 24))}
        sock.close(0)
        c.close()
    assert cluster.keys() == single.keys() and len(cluster) == 24
    for key in cluster:
        assert np.allclose(cluster[key], single[key], atol=1e-4), key


def test_a_killed_worker_streams_continue_from_their_snapshots(tmp_path):
    n = 40
    with running_gateway(tmp_path, workers=2, snapshot_every="5") as gw:
        c = Client(gw)
        time.sleep(0.3)
        rec = _dealer(gw)  # lossless, acked, a window of 4 frames in flight
        live = _dealer(gw)
        imgs = frames(n)
        sent, acks, victim, killed_at = 0, [], None, None
        deadline = time.monotonic() + 240
        while len([a for a in acks if a["status"] == "processed"]) < n and time.monotonic() < deadline:
            while sent < n and sent - len(acks) < 4:
                rec.send_multipart(wire.encode_frame(imgs[sent], "rec", sent, lossless=True, ack=True, session="p1"))
                live.send_multipart(wire.encode_frame(imgs[sent], "cam", sent, lossless=False))
                sent += 1
            if rec.poll(100):
                acks.append(json.loads(rec.recv_multipart()[-1]))
            if victim is None and sum(a["status"] == "processed" for a in acks) >= 12:
                victim = gw.routes["rec"].worker
                killed_at = sum(a["status"] == "processed" for a in acks)
                ray.kill(gw.workers[victim].actor)  # the actor process dies mid-stream
        assert wait_for(lambda: _stats(c)["streams"]["rec"]["processed"] == n, 60)
        st = _stats(c)
        # a malformed message and a bad frame at the gateway: counted, answered, the gateway goes on
        rec.send_multipart([b"not json", b"x"])
        bad = _acks(rec, 1)
        assert _stats(c)["node"]["errors"] >= 1
        c.close()
        rec.close(0)
        live.close(0)
    processed = [a["seq"] for a in acks if a["status"] == "processed"]
    # every lossless frame processed, and its sender told so exactly once (replayed frames are not re-acked)
    assert sorted(processed) == list(range(n)), processed
    s = st["streams"]["rec"]
    assert s["worker"] != victim and s["cluster"]["failovers"] == 1 and s["cluster"]["frames_lost"] == 0
    assert s["restored_from"] is not None and s["cluster"]["frames_replayed"] >= 1
    assert s["processed"] == n  # the continued stream holds every frame: snapshot + replay + the rest
    node = st["node"]
    assert node["cluster"]["worker_deaths"] == 1 and node["cluster"]["restarts"] == 1
    assert {w["state"] for w in node["workers"]} >= {"dead", "ready"} and len(node["cluster"]["recoveries_s"]) >= 1
    assert killed_at >= 12
    cam = st["streams"]["cam"]  # placed on the other worker (least loaded): untouched by the kill
    assert cam["worker"] != victim and cam["cluster"]["failovers"] == 0 and cam["processed"] >= 1
    assert bad and bad[0]["status"] == "rejected"
    traj = (tmp_path / "serve" / "streams" / "rec" / "trajectory.txt").read_text().splitlines()
    assert len([ln for ln in traj if ln and not ln.startswith("#")]) == n


def test_a_drained_worker_hands_its_streams_over_without_losing_a_frame(tmp_path):
    n = 16
    with running_gateway(tmp_path, workers=2, lossless=True) as gw:
        c = Client(gw)
        time.sleep(0.3)
        sock = _dealer(gw)
        imgs = frames(n)
        for i in range(n // 2):
            sock.send_multipart(wire.encode_frame(imgs[i], "rec", i, ack=True))
        first = _acks(sock, n // 2)
        assert [a["status"] for a in first] == ["processed"] * (n // 2)
        old = gw.routes["rec"].worker
        # a frame only its worker finds undecodable (the gateway checks headers, not pixels) opens no
        # stream there and leaves no route here; one the gateway refuses is answered with its stream and seq
        png = wire.encode_frame(imgs[0], "junk", 3, encoding="png", ack=True)
        cut = bytes(png[1])[:bytes(png[1]).find(b"IDAT") + 20]
        sock.send_multipart([png[0], cut])
        jpeg = wire.encode_frame(imgs[0], "junk2", 7, encoding="jpeg", ack=True)
        sock.send_multipart([jpeg[0], b"not a jpeg at all"])
        junk = sorted(_acks(sock, 2), key=lambda a: a["stream_id"])
        assert [(a["stream_id"], a["seq"], a["status"]) for a in junk] == [("junk", 3, "rejected"), ("junk2", 7, "rejected")]
        assert "does not decode" in junk[0]["error"] and "jpeg" in junk[1]["error"]
        assert wait_for(lambda: set(_stats(c)["streams"]) == {"rec"}, 10)
        reply, _ = c.request("drain_worker", worker=old)
        assert reply["ok"] and reply["streams_moving"] == 1, reply
        again, _ = c.request("drain_worker", worker=old)
        assert not again["ok"] and "being drained already" in again["error"]
        for i in range(n // 2, n):  # sent while it moves: held at the gateway, then delivered
            sock.send_multipart(wire.encode_frame(imgs[i], "rec", i, ack=True))
        rest = _acks(sock, n // 2)
        assert wait_for(lambda: _stats(c)["streams"]["rec"]["processed"] == n, 60)
        st = _stats(c)
        bad, _ = c.request("drain_worker", worker="w9")
        c.close()
        sock.close(0)
    assert [a["status"] for a in rest] == ["processed"] * (n // 2) and [a["seq"] for a in rest] == list(range(n // 2, n))
    s = st["streams"]["rec"]
    assert s["worker"] != old and s["cluster"]["moves"] == 1 and s["cluster"]["frames_lost"] == 0
    assert s["restored_from"] is not None
    states = {w["name"]: w["state"] for w in st["node"]["workers"]}
    assert states[old] == "retired"
    assert not bad["ok"] and "no running worker 'w9'" in bad["error"]


def test_a_replay_longer_than_the_lossless_queue_is_fed_a_queue_at_a_time(tmp_path):
    # no snapshot yet: the whole stream is replayed to the next worker, 3x its lossless queue
    n, extra = 12, 3
    with running_gateway(tmp_path, workers=2, lossless=True, lossless_queue=4, snapshot_every="100") as gw:
        c = Client(gw)
        sock = _dealer(gw)
        imgs = frames(n + extra)
        acks = []
        for i in range(n):
            sock.send_multipart(wire.encode_frame(imgs[i], "rec", i, ack=True, session="p1"))
            if i % 3 == 2:  # a window of 3: the worker never refuses one
                acks += _acks(sock, 3)
        assert [a["status"] for a in acks] == ["processed"] * n
        victim = gw.routes["rec"].worker
        ray.kill(gw.workers[victim].actor)
        assert wait_for(lambda: gw.routes["rec"].failovers == 1 and _stats(c)["streams"]["rec"]["processed"] == n, 60)
        for i in range(n, n + extra):  # and it goes on
            sock.send_multipart(wire.encode_frame(imgs[i], "rec", i, ack=True, session="p1"))
        later = _acks(sock, extra)
        assert wait_for(lambda: _stats(c)["streams"]["rec"]["processed"] == n + extra, 60)
        st = _stats(c)
        more = _acks(sock, 1, timeout=1.0)
        c.close()
        sock.close(0)
    assert [(a["seq"], a["status"]) for a in later] == [(i, "processed") for i in range(n, n + extra)]
    assert more == []  # replayed frames are not acknowledged twice
    s = st["streams"]["rec"]
    assert s["worker"] != victim and s["cluster"]["frames_replayed"] == n and s["cluster"]["frames_lost"] == 0
    assert s["cluster"]["resend_waiting"] == 0 and s["processed"] == n + extra
    traj = (tmp_path / "serve" / "streams" / "rec" / "trajectory.txt").read_text().splitlines()
    assert len([ln for ln in traj if ln and not ln.startswith("#")]) == n + extra


def test_frames_for_a_stream_whose_only_worker_died_wait_for_its_replacement(tmp_path):
    with running_gateway(tmp_path, workers=1, lossless=True, snapshot_every="2") as gw:
        c = Client(gw)
        sock, live = _dealer(gw), _dealer(gw)
        imgs = frames(10)
        first = []
        for i in range(4):  # one at a time: the live stream processes each of its frames too
            live.send_multipart(wire.encode_frame(imgs[i], "cam", i, lossless=False))
            sock.send_multipart(wire.encode_frame(imgs[i], "rec", i, ack=True))
            first += _acks(sock, 1)
        assert [a["status"] for a in first] == ["processed"] * 4
        assert wait_for(lambda: _stats(c)["streams"].get("cam", {}).get("processed", 0) >= 1, 30)
        snaps = tmp_path / "serve" / "snapshots" / "cam"
        assert wait_for(lambda: snaps.is_dir() and any(snaps.iterdir()), 30)  # the live stream has a snapshot
        time.sleep(1.0)  # reported by the next exchanges
        cam_before = _stats(c)["streams"]["cam"]["processed"]
        ray.kill(gw.workers["w0"].actor)
        assert wait_for(lambda: gw.workers["w0"].state == "dead", 30)
        for i in range(4, 10):  # no worker at all for a while: held, then processed by the new one
            sock.send_multipart(wire.encode_frame(imgs[i], "rec", i, ack=True))
            live.send_multipart(wire.encode_frame(imgs[i], "cam", i, lossless=False))
        later = _acks(sock, 6, timeout=180)
        # the live stream continues from its snapshot with the newest frame that came meanwhile
        assert wait_for(lambda: _stats(c)["streams"]["cam"]["processed"] > _stats(c)["streams"]["cam"]["cluster"]
                        ["restored_frames"], 60)
        st = _stats(c)
        unknown, _ = c.request("no_such_command")
        c.close()
        sock.close(0)
        live.close(0)
    assert [a["seq"] for a in later if a["status"] == "processed"] == list(range(4, 10))
    s = st["streams"]["rec"]
    assert s["worker"] == "w1" and s["cluster"]["failovers"] == 1 and s["cluster"]["frames_lost"] == 0
    assert st["node"]["cluster"]["restarts"] == 1
    assert st["node"]["cluster"]["restore_mismatch"] == 0  # each stream restored where the gateway expected
    cam = st["streams"]["cam"]  # the live stream on the same worker: continued, what it lost is counted
    assert cam["worker"] == "w1" and cam["cluster"]["failovers"] == 1
    lost, kept = cam["cluster"]["frames_lost"], cam["cluster"]["restored_frames"]
    assert kept is not None and kept >= 2 and cam["restored_from"] is not None
    assert 1 <= cam_before <= lost + kept <= 4  # what it held at the death: kept (the snapshot) or counted lost
    assert not unknown["ok"] and "drain_worker" in unknown["error"]


def test_ray_settings_need_ray_and_are_checked(capsys):
    from streamrecon.cli import main

    assert main(["serve", "--ray-workers", "2", "--weights", WEIGHTS]) == 2
    assert "--ray-workers is a --ray setting: add --ray [ADDRESS]" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="--ray-streams-per-worker must be >= 1"):
        ClusterSettings(ray_streams_per_worker=0).validate()
    with pytest.raises(SettingsError, match="--viewer/--save-rrd are not available with --ray"):
        from streamrecon.cluster import Gateway

        Gateway(ServeConfig.of(save_rrd="x.rrd", weights=WEIGHTS), ClusterSettings(ray_workers=1))


def test_serve_ray_cli_starts_its_own_ray_routes_two_streams_and_flushes_them_on_sigterm(tmp_path):
    import signal
    import subprocess
    import sys

    from streamrecon.mapping import read_tum
    from streamrecon_bridges.camera_pub import Publisher

    ingest, results, control = free_endpoints()
    out = tmp_path / "serve"
    proc = subprocess.Popen([sys.executable, "-m", "streamrecon", "serve", "--ray", "--ray-workers", "2",
                             "--ray-local-cpus", "2", "--weights", WEIGHTS, "--size", "64", "--ingest", ingest,
                             "--results", results, "--control", control, "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "ingest tcp://127.0.0.1" in proc.stdout.readline()
        pubs = [Publisher(ingest, sid, lossless=True) for sid in ("left", "right")]
        for pub in pubs:
            for img in frames(3, seed=len(pub.stream_id)):
                pub.send(img)
        assert all(p.flush(120) for p in pubs)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    for sid in ("left", "right"):
        assert len(read_tum(out / "streams" / sid / "trajectory.txt")[0]) == 3
        assert (out / "streams" / sid / "map.ply").exists()
        status = json.loads((out / "streams" / sid / "status.json").read_text())
        assert status["processed"] == 3 and status["closed"]
    assert len(list((out / "snapshots" / "left").iterdir())) >= 1  # --ray snapshots by default (failover)
    for pub in pubs:
        pub.close()
