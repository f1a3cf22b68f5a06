#!/usr/bin/env python3
"""Measure the ZeroMQ node over loopback: latency, batched throughput, codec speed.

    python tools/bench_serve.py latency --weights CKPT --streams 1 --fps 10 --seconds 20 --size 224
    python tools/bench_serve.py throughput --weights CKPT --streams 4 --frames 40 --max-batch 4 --size 224
    python tools/bench_serve.py codec --seconds 5
    python tools/bench_serve.py throughput --weights bundled --size 160 --streams 4 --ray-workers 2   # serve --ray
    python tools/bench_serve.py failover --weights bundled --size 160 --frames 60 --kill-after 20

``--ray-workers N`` runs ``streamrecon serve --ray`` (a local Ray instance, N worker actors of
``--ray-cpus-per-worker`` CPUs) instead of the single node; measuring starts once every worker is
ready. ``failover`` (always ``--ray``, 2 workers): two lossless streams and one live stream; after
``--kill-after`` frames of ``cam0`` the worker holding the live stream (and one of the lossless ones)
is killed (SIGKILL, as the OOM killer would) and the recovery is measured.

``latency`` and ``throughput`` start ``streamrecon serve`` as a separate process; publishers (one
thread per stream, real frames from the CUT3R example video) and a results subscriber run here.
Latency = pose received here - frame sent here (same clock).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from streamrecon import wire

REPO = Path(__file__).resolve().parents[1]
CLIP = REPO.parent / "shared" / "data" / "cut3r_examples" / "lady-running.mp4"


def _frames(n: int) -> list[np.ndarray]:
    import cv2

    cap, out = cv2.VideoCapture(str(CLIP)), []
    while len(out) < n:
        ok, bgr = cap.read()
        if not ok:
            cap.release()
            cap = cv2.VideoCapture(str(CLIP))
            continue
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return out


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _stats(eps: dict, timeout_s: float = 30.0) -> dict:
    ctl = zmq.Context.instance().socket(zmq.DEALER)
    ctl.linger = 0
    ctl.connect(eps["control"])
    ctl.send_multipart(wire.encode_request("stats"))
    try:
        if not ctl.poll(int(timeout_s * 1000)):
            raise TimeoutError("no reply to stats")
        return wire.decode_reply(ctl.recv_multipart())[0]
    finally:
        ctl.close()


def _start_node(args, extra: list[str]) -> tuple[subprocess.Popen, dict]:
    p = _free_ports(3)
    eps = {"ingest": f"tcp://127.0.0.1:{p[0]}", "results": f"tcp://127.0.0.1:{p[1]}", "control": f"tcp://127.0.0.1:{p[2]}"}
    weights = [] if args.weights == "bundled" else ["--weights", args.weights]
    cmd = [sys.executable, "-m", "streamrecon", "serve", *weights, "--size", str(args.size),
           "--geometry-stride", "0", "--output-dir", args.output_dir, *extra]
    if args.ray_workers:
        cmd += ["--ray", "--ray-workers", str(args.ray_workers), "--ray-cpus-per-worker", str(args.ray_cpus_per_worker)]
    for k, v in eps.items():
        cmd += [f"--{k}", v]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdout.readline()  # "streamrecon node: ..." once bound
    deadline = time.monotonic() + 300
    while args.ray_workers and time.monotonic() < deadline:  # every worker started (torch imported, model loaded)
        workers = _stats(eps)["node"]["workers"]
        if workers and all(w["state"] == "ready" for w in workers):
            break
        time.sleep(0.5)
    return proc, eps


def _percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"n": len(a), "p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1),
            "mean": round(float(a.mean()), 1)} if len(a) else {"n": 0}


def latency(args) -> dict:
    frames = _frames(64)
    proc, eps = _start_node(args, ["--max-batch", str(args.max_batch)])
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(eps["results"])
    sent: dict[tuple[str, int], int] = {}
    stop = threading.Event()
    time.sleep(0.5)

    def publish(k: int) -> None:
        sock = ctx.socket(zmq.DEALER)
        sock.sndhwm, sock.linger = 2, 0
        sock.connect(eps["ingest"])
        period, t_next, seq = 1.0 / args.fps, time.monotonic(), 0
        while not stop.is_set():
            now_ns = time.time_ns()
            sent[(f"cam{k}", seq)] = now_ns
            try:
                sock.send_multipart(wire.encode_frame(frames[seq % len(frames)], f"cam{k}", seq, stamp_ns=now_ns),
                                    flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            seq += 1
            t_next += period
            time.sleep(max(0.0, t_next - time.monotonic()))
        sock.close()

    threads = [threading.Thread(target=publish, args=(k,)) for k in range(args.streams)]
    for t in threads:
        t.start()
    lat, received, t_end = [], 0, time.monotonic() + args.seconds
    warmup_until = time.monotonic() + 3.0
    while time.monotonic() < t_end:
        if sub.poll(100):
            topic, header, _ = wire.decode_result(sub.recv_multipart())
            if topic.endswith("/pose"):
                received += 1
                key = (header["stream_id"], header["seq"])
                if key in sent and time.monotonic() > warmup_until:
                    lat.append((time.time_ns() - sent[key]) / 1e6)
    stop.set()
    for t in threads:
        t.join()
    proc.terminate()
    proc.wait(30)
    total_sent = len(sent)
    return {"mode": "latency", "streams": args.streams, "input_fps_per_stream": args.fps, "size": args.size,
            "max_batch": args.max_batch, "seconds": args.seconds, "frames_sent": total_sent, "poses": received,
            "processed_fraction": round(received / max(total_sent, 1), 3),
            "output_fps_total": round(received / args.seconds, 2), "latency_ms": _percentiles(lat)}


def throughput(args) -> dict:
    frames = _frames(args.frames)
    proc, eps = _start_node(args, ["--max-batch", str(args.max_batch), "--lossless"])
    ctx = zmq.Context.instance()
    from streamrecon_bridges.camera_pub import Publisher

    pubs = [Publisher(eps["ingest"], f"cam{k}", encoding=args.encoding, lossless=True, window=4, context=ctx)
            for k in range(args.streams)]
    done = []

    def run(pub) -> None:
        for f in frames:
            pub.send(f)
        pub.flush(600)
        done.append(pub.acked)

    # warm-up: one frame per stream
    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(p,)) for p in pubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    stats = _stats(eps)["node"]
    proc.terminate()
    proc.wait(60)
    total = sum(done)
    out = {"mode": "throughput", "streams": args.streams, "frames_per_stream": args.frames, "size": args.size,
           "encoding": args.encoding,
           "max_batch": args.max_batch, "frames": total, "wall_s": round(wall, 2), "frames_per_s": round(total / wall, 2)}
    if args.ray_workers:
        ws = stats["workers"]
        out.update(ray_workers=args.ray_workers, cpus_per_worker=args.ray_cpus_per_worker,
                   gateway_ms_per_frame=stats["gateway_ms_per_frame"],
                   model_calls=sum(w["model_calls"] for w in ws), batched_calls=sum(w["batched_calls"] for w in ws),
                   streams_per_worker=[len(w["streams"]) for w in ws],
                   exchange_ms_mean=[w["exchange_ms_mean"] for w in ws])
    else:
        out.update(model_calls=stats["model_calls"], batched_calls=stats["batched_calls"],
                   max_batch_seen=stats["max_batch_seen"])
    return out


def failover(args) -> dict:
    import os
    import signal

    from streamrecon_bridges.camera_pub import Publisher

    args.ray_workers = args.ray_workers or 2
    frames = _frames(args.frames)
    proc, eps = _start_node(args, ["--max-batch", str(args.max_batch), "--snapshot-every", str(args.snapshot_every)])
    ctx = zmq.Context.instance()
    pubs = [Publisher(eps["ingest"], f"cam{k}", lossless=True, window=4, context=ctx) for k in range(2)]
    live = ctx.socket(zmq.DEALER)
    live.linger = 0
    live.connect(eps["ingest"])
    ack_times: dict[str, list[float]] = {"cam0": [], "cam1": []}
    killed = {}

    def run(pub) -> None:
        for i, f in enumerate(frames):
            pub.send(f)
            ack_times[pub.stream_id].append(time.monotonic())
            if pub.stream_id == "cam0" and i == args.kill_after and not killed:
                st = _stats(eps)
                w = next(w for w in st["node"]["workers"] if "live" in w["streams"])
                killed.update(worker=w["name"], pid=w["pid"], t=time.monotonic(), streams=w["streams"])
                os.kill(w["pid"], signal.SIGKILL)
        pub.flush(600)

    def run_live() -> None:
        for i, f in enumerate(frames):
            live.send_multipart(wire.encode_frame(f, "live", i, lossless=False))
            time.sleep(0.05)

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(p,)) for p in pubs] + [threading.Thread(target=run_live)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    time.sleep(2 * 0.25 + 1.0)  # the last exchange and heartbeat
    st = _stats(eps)
    proc.terminate()
    proc.wait(60)
    streams = {sid: {"processed": s["processed"], **{k: s["cluster"][k] for k in (
        "worker", "failovers", "frames_lost", "frames_replayed", "restored_frames", "last_recovery_s", "held_dropped")}}
        for sid, s in st["streams"].items()}
    t_kill = killed.get("t", t0)
    gap = {sid: round(max(b - a for a, b in zip(ts, ts[1:])), 3) if len(ts) > 1 else None for sid, ts in ack_times.items()}
    after = {sid: next((round(x - t_kill, 3) for x in ts if x > t_kill), None) for sid, ts in ack_times.items()}
    return {"mode": "failover", "frames_per_stream": args.frames, "kill_after": args.kill_after, "size": args.size,
            "snapshot_every": args.snapshot_every, "killed": {k: v for k, v in killed.items() if k != "t"},
            "wall_s": round(wall, 2), "recoveries_s": st["node"]["cluster"]["recoveries_s"],
            "restarts": st["node"]["cluster"]["restarts"], "largest_ack_gap_s": gap, "first_ack_after_kill_s": after,
            "streams": streams, "acked": {p.stream_id: p.acked for p in pubs}}


def codec(args) -> dict:
    img = _frames(1)[0]
    import cv2

    img = np.ascontiguousarray(cv2.resize(img, (640, 480)))
    out = {"mode": "codec", "frame": "640x480 rgb8"}
    for enc in ("rgb8", "jpeg"):
        n, t_end = 0, time.monotonic() + args.seconds
        t0 = time.monotonic()
        while time.monotonic() < t_end:
            wire.decode_frame(wire.encode_frame(img, "cam", n, encoding=enc)).image()
            n += 1
        out[f"in_process_{enc}_msgs_per_s"] = round(n / (time.monotonic() - t0), 1)
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.ROUTER)
    port = b.bind_to_random_port("tcp://127.0.0.1")
    a.connect(f"tcp://127.0.0.1:{port}")
    a.sndhwm = b.rcvhwm = 100
    n, stop = 0, threading.Event()

    def sender() -> None:
        i = 0
        while not stop.is_set():
            try:
                a.send_multipart(wire.encode_frame(img, "cam", i), flags=zmq.NOBLOCK)
                i += 1
            except zmq.Again:
                time.sleep(0.0005)

    t = threading.Thread(target=sender)
    t.start()
    t0, t_end = time.monotonic(), time.monotonic() + args.seconds
    while time.monotonic() < t_end:
        if b.poll(100):
            parts = b.recv_multipart(copy=False)
            wire.decode_frame(parts[1:]).image()
            n += 1
    stop.set()
    t.join()
    out["loopback_tcp_rgb8_msgs_per_s"] = round(n / (time.monotonic() - t0), 1)
    out["loopback_tcp_rgb8_MB_per_s"] = round(n * img.nbytes / 1e6 / (time.monotonic() - t0), 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["latency", "throughput", "codec", "failover"])
    ap.add_argument("--weights", default=str(REPO.parent / "shared" / "golden" / "tiny_dpt" / "checkpoint.pth"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--output-dir", default="/tmp/bench_serve_out")
    ap.add_argument("--encoding", default="rgb8", choices=["rgb8", "jpeg", "png"], help="throughput: frame encoding")
    ap.add_argument("--ray-workers", type=int, default=0, help="0: the single node; N: serve --ray with N workers")
    ap.add_argument("--ray-cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--kill-after", type=int, default=20, help="failover: frames of cam0 acknowledged before the kill")
    ap.add_argument("--snapshot-every", default="10", help="failover: --snapshot-every of the node")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    result = {"latency": latency, "throughput": throughput, "codec": codec, "failover": failover}[args.mode](args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
