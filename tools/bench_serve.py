#!/usr/bin/env python3
"""Measure the ZeroMQ node over loopback: latency, batched throughput, codec speed.

    python tools/bench_serve.py latency --weights CKPT --streams 1 --fps 10 --seconds 20 --size 224
    python tools/bench_serve.py throughput --weights CKPT --streams 4 --frames 40 --max-batch 4 --size 224
    python tools/bench_serve.py codec --seconds 5

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


def _start_node(args, extra: list[str]) -> tuple[subprocess.Popen, dict]:
    p = _free_ports(3)
    eps = {"ingest": f"tcp://127.0.0.1:{p[0]}", "results": f"tcp://127.0.0.1:{p[1]}", "control": f"tcp://127.0.0.1:{p[2]}"}
    cmd = [sys.executable, "-m", "streamrecon", "serve", "--weights", args.weights, "--size", str(args.size),
           "--geometry-stride", "0", "--output-dir", "/tmp/bench_serve_out", *extra]
    for k, v in eps.items():
        cmd += [f"--{k}", v]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc.stdout.readline()  # "streamrecon node: ..." once bound
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

    pubs = [Publisher(eps["ingest"], f"cam{k}", lossless=True, window=4, context=ctx) for k in range(args.streams)]
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
    ctl = ctx.socket(zmq.REQ)
    ctl.connect(eps["control"])
    ctl.send_multipart(wire.encode_request("stats"))
    stats = wire.decode_reply(ctl.recv_multipart())[0]["node"]
    proc.terminate()
    proc.wait(30)
    total = sum(done)
    return {"mode": "throughput", "streams": args.streams, "frames_per_stream": args.frames, "size": args.size,
            "max_batch": args.max_batch, "frames": total, "wall_s": round(wall, 2),
            "frames_per_s": round(total / wall, 2), "model_calls": stats["model_calls"],
            "batched_calls": stats["batched_calls"], "max_batch_seen": stats["max_batch_seen"]}


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
    ap.add_argument("mode", choices=["latency", "throughput", "codec"])
    ap.add_argument("--weights", default=str(REPO.parent / "shared" / "golden" / "tiny_dpt" / "checkpoint.pth"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    result = {"latency": latency, "throughput": throughput, "codec": codec}[args.mode](args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
