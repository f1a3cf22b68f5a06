"""Attack a ``streamrecon serve`` node as a hostile local client, a careless user and a failing network
would, and report what got through: one JSON report, one line per class of attack.

    python tools/attack_node.py --json attack.json
    python tools/attack_node.py --weights ../shared/golden/tiny_dpt/checkpoint.pth --fuzz 10000

The node runs as a subprocess (``streamrecon serve``, loopback, a temporary output directory), so its
memory can be read from ``/proc`` and its death is seen. Classes:

* ``fuzz``: N malformed messages (random bytes, broken JSON, wrong fields and part counts, mutated
  valid headers) then one valid frame: the node's counters, internal errors, RSS before/after.
* ``paths``: ``save_map`` escapes, probe names with ``..``, symlinks planted under ``streams/`` and
  ``snapshots/`` before and while streams run: files that appeared outside the output directory.
* ``bombs``: PNG/JPEG headers declaring huge images, junk frames for new streams: the node's peak RSS
  growth, streams opened.
* ``lossless``: frames lost with a 2-frame queue (busy), across a SIGTERM (shutdown) and a SIGTERM +
  restart of the node, counted from the trajectories the nodes wrote.
* ``stall``: the longest gap between two results of a 15 fps stream while another client sends
  ``query_raymap`` at the node's pixel budget (and over it).
* ``req``: an imagezmq REQ/REP sender on a default (live) node: frames lost.

Measurements, not a test: the figures go in the closing note of a hardening change.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import zmq

from streamrecon import wire
from streamrecon.mapping import read_tum
from streamrecon_bridges.camera_pub import Publisher

_SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class NodeProcess:
    """``streamrecon serve`` in a subprocess on free loopback ports."""

    def __init__(self, out: Path, weights: str, *extra: str, ports: list[int] | None = None) -> None:
        self.out = out
        self.ports = ports or _ports(3)
        self.ingest, self.results, self.control = (f"tcp://127.0.0.1:{p}" for p in self.ports)
        cmd = [sys.executable, "-m", "streamrecon", "serve", "--size", "64", "--ingest", self.ingest, "--results",
               self.results, "--control", self.control, "--output-dir", str(out), "--status-interval-s", "0.5", *extra]
        if weights:
            cmd += ["--weights", weights]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if "ingest" not in line:
            raise RuntimeError(f"the node did not start: {line!r}")
        self.ctx = zmq.Context.instance()
        self.ctl = self.ctx.socket(zmq.DEALER)
        self.ctl.linger = 0
        self.ctl.connect(self.control)

    def request(self, cmd: str, timeout_s: float = 30.0, **fields):
        self.ctl.send_multipart(wire.encode_request(cmd, **fields))
        if not self.ctl.poll(int(timeout_s * 1000)):
            return None
        return wire.decode_reply(self.ctl.recv_multipart())[0]

    def rss_mb(self, key: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.ctl.close(0)
        if self.alive():
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _frames(n: int, hw=(48, 64), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (hw[0] + n, hw[1] + n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(base[i:i + hw[0], i:i + hw[1]]) for i in range(n)]


def _dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.connect(endpoint)
    return s


def _acks(sock, n: int, timeout_s: float = 30.0) -> list[dict]:
    out, deadline = [], time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if sock.poll(100):
            try:
                out.append(json.loads(sock.recv_multipart()[-1]))
            except ValueError:
                out.append({})
    return out


def _files_outside(outside: Path) -> int:
    return sum(1 for p in outside.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------- classes


def attack_fuzz(work: Path, weights: str, n: int) -> dict:
    node = NodeProcess(work / "fuzz", weights)
    rss0 = node.rss_mb()
    rng = random.Random(0)
    sock = _dealer(node.ingest)
    valid = wire.encode_frame(_frames(1)[0], "cam", 0)
    header = json.loads(valid[0])
    for i in range(n):
        kind = i % 6
        if kind == 0:
            parts = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))]
        elif kind == 1:
            parts = [valid[0][: rng.randint(0, len(valid[0]))], valid[1]]
        elif kind == 2:
            h = dict(header)
            key = rng.choice(list(h))
            h[key] = rng.choice([None, -1, 2**70, "x" * 300, [], {}, True, 1.5, "cam\n"])
            parts = [json.dumps(h).encode(), valid[1]]
        elif kind == 3:
            parts = [valid[0], valid[1][: rng.randint(0, len(valid[1]))]]
        elif kind == 4:
            parts = [valid[0]] * rng.randint(3, 6)
        else:
            h = {**header, "stream_id": f"s{rng.randint(0, 10**6)}", "encoding": rng.choice(["jpeg", "png"])}
            parts = [json.dumps(h).encode(), bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 256)))]
        sock.send_multipart(parts)
        if i % 500 == 499:
            time.sleep(0.05)  # the node's receive queue is bounded: give it a moment to drain
    sock.send_multipart(wire.encode_frame(_frames(1)[0], "after", 0, ack=True, lossless=True))
    deadline, ok = time.monotonic() + 60, []
    while not ok and time.monotonic() < deadline:  # the rejections of the fuzz come first
        ok = [a for a in _acks(sock, 1, 1.0) if a.get("stream_id") == "after"]
    stats = node.request("stats") or {}
    rss1 = node.rss_mb()
    alive = node.alive()
    node.stop()
    st = stats.get("node", {})
    return {"messages": n, "crashed": not alive, "internal_errors": st.get("internal_errors"),
            "node_errors": st.get("errors"), "messages_counted": st.get("messages"),
            "streams_opened": len(stats.get("streams", {})), "valid_frame_after": bool(ok and ok[0].get("status") == "processed"),
            "rss_mb_before": round(rss0, 1), "rss_mb_after": round(rss1, 1)}


def attack_paths(work: Path, weights: str) -> dict:
    out, outside = work / "paths" / "out", work / "paths" / "outside"
    (out / "streams").mkdir(parents=True)
    (out / "snapshots").mkdir()
    outside.mkdir()
    os.symlink(outside, out / "streams" / "planted")
    os.symlink(outside, out / "snapshots" / "planted2")
    node = NodeProcess(out, weights, "--lossless", "--idle-timeout-s", "1")
    sock = _dealer(node.ingest)
    tried = refused = 0
    for sid in ("planted", "planted2", "victim", "cam"):
        sock.send_multipart(wire.encode_frame(_frames(1)[0], sid, 0, ack=True))
    acks = _acks(sock, 4)
    refused_streams = sum(a.get("status") == "rejected" for a in acks)
    escapes = ["../outside", "/tmp/x", "a/../../x", "../../streams/victim", "../victim/map.ply", "", "..", ".",
               "x/../../../outside", "\x00", "a\\..\\..\\x", "streams/victim", "~/x", "a" * 300]
    accepted = []
    for path in escapes:
        tried += 1
        r = node.request("save_map", stream_id="cam", path=path)
        if (r or {}).get("ok"):
            accepted.append({"path": path, "landed_in_own_exports": all(
                Path(f).resolve().is_relative_to((out / "exports" / "cam").resolve()) for f in r["files"])})
        else:
            refused += 1
    for name in ("../../outside/x", "/abs", "a/b", "..", "x" * 100):
        tried += 1
        r = node.request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist(), size=[64, 64], name=name)
        refused += not (r or {}).get("ok", False)
    # a stream's folder swapped for a link out while it runs, then closed (idle) and at shutdown
    d = out / "streams" / "victim"
    d.rename(work / "paths" / "moved")
    os.symlink(outside, d)
    time.sleep(2.5)
    for i, img in enumerate(_frames(2)):
        sock.send_multipart(wire.encode_frame(img, "late", i, ack=True))
    _acks(sock, 2)
    (out / "streams" / "late").rename(work / "paths" / "moved2")
    os.symlink(outside, out / "streams" / "late")
    alive = node.alive()
    node.stop()
    return {"requests_tried": tried, "requests_refused": refused, "accepted": accepted,
            "planted_streams_refused": refused_streams,
            "files_outside": _files_outside(outside), "crashed": not alive}


def _png_declaring(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * (1 << 20))) + chunk(b"IEND", b"")


def _real_png_bomb(w: int, h: int) -> bytes:
    """A real, fully decodable PNG of ``w x h`` zeros (compresses ~1000:1), built row by row."""
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * w)
    data = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _jpeg_declaring(w: int, h: int) -> bytes:
    import cv2

    jpg = bytearray(cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    i = jpg.find(b"\xff\xc0")
    jpg[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(jpg)


def attack_bombs(work: Path, weights: str) -> dict:
    node = NodeProcess(work / "bombs", weights, "--max-streams", "4")
    sock = _dealer(node.ingest)
    out = {}
    classes = {"png_real_12000x8000": ("png", _real_png_bomb(12000, 8000)),
               "png_header_16384x16384": ("png", _png_declaring(16384, 16384)),
               "jpeg_header_65000x65000": ("jpeg", _jpeg_declaring(65000, 65000))}
    for name, (enc, payload) in classes.items():
        before = node.rss_mb("VmHWM")
        t0 = time.perf_counter()
        sock.send_multipart([json.dumps({"v": 1, "stream_id": "cam", "seq": 0, "encoding": enc, "ack": True}).encode(),
                             payload])
        ack = _acks(sock, 1)
        out[name] = {"bytes": len(payload), "status": ack[0].get("status") if ack else None,
                     "peak_rss_growth_mb": round(node.rss_mb("VmHWM") - before, 1),
                     "answer_ms": round(1e3 * (time.perf_counter() - t0), 1)}
    good = wire.encode_frame(_frames(1)[0], "x", 0, encoding="jpeg")[1]
    junk = good[: good.find(b"\xff\xda") + 20]
    for i in range(16):
        sock.send_multipart([json.dumps({"v": 1, "stream_id": f"junk{i}", "seq": 0, "encoding": "jpeg"}).encode(), junk])
    time.sleep(1.0)
    sock.send_multipart(wire.encode_frame(_frames(1)[0], "real", 0, ack=True, lossless=True))
    ack = _acks(sock, 1)
    stats = node.request("stats") or {}
    out["junk_frames"] = {"sent": 16, "streams_opened": len(stats.get("streams", {})) - 1,
                          "real_camera_after": bool(ack and ack[0].get("status") == "processed")}
    out["crashed"] = not node.alive()
    node.stop()
    return out


def _seen(dirs: list[Path]) -> set[int]:
    seen: set[int] = set()
    for d in dirs:
        if (d / "trajectory.txt").exists():
            seen |= set(np.round(read_tum(d / "trajectory.txt")[0]).astype(int).tolist())
    return seen


def attack_lossless(work: Path, weights: str, n: int = 200) -> dict:
    imgs = _frames(n)
    res = {}
    # busy: a 2-frame queue, 16 frames in flight
    node = NodeProcess(work / "busy", weights, "--lossless-queue", "2")
    pub = Publisher(node.ingest, "cam", lossless=True, window=16)
    pub.give_up_s = 60
    for i, img in enumerate(imgs):
        pub.send(img, stamp_ns=(i + 1) * 10**9)
    pub.flush(60)
    st = (node.request("stats") or {}).get("streams", {}).get("cam", {})
    node.stop()
    res["busy"] = {"sent": n, "refused_busy": st.get("busy"), "acked": pub.acked,
                   "lost": n - len(_seen([work / "busy" / "streams" / "cam"]))}
    pub.close()
    # shutdown and restart: SIGTERM while frames are in flight; a second node on the same ports
    ports = _ports(3)
    node = NodeProcess(work / "restart", weights, "--lossless", ports=ports)
    pub = Publisher(node.ingest, "cam", lossless=True, window=8, ack_timeout=1.0)
    pub.give_up_s = 60
    for i in range(n // 2):
        pub.send(imgs[i], stamp_ns=(i + 1) * 10**9)
    node.stop()  # SIGTERM with frames in flight: the node drains what it accepted
    first = _seen([work / "restart" / "streams" / "cam"])
    res["shutdown"] = {"sent_before_sigterm": n // 2, "processed_by_first_node": len(first),
                       "acked_by_then": pub.acked}
    node = NodeProcess(work / "restart", weights, "--lossless", ports=ports)
    for i in range(n // 2, n):
        pub.send(imgs[i], stamp_ns=(i + 1) * 10**9)
    delivered = pub.flush(60)
    node.stop()
    runs = [work / "restart" / "streams" / "cam", *sorted((work / "restart" / "previous").glob("cam-*"))]
    seen = _seen(runs)
    res["restart"] = {"sent": n, "acked": pub.acked, "delivered": delivered, "lost": len(set(range(1, n + 1)) - seen),
                      "processed_twice": sum(len(read_tum(d / "trajectory.txt")[0]) for d in runs) - len(seen)}
    pub.close()
    return res


def attack_stall(work: Path, weights: str, budget: int) -> dict:
    node = NodeProcess(work / "stall", weights, "--max-probe-pixels", str(budget))
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.linger = 0
    sub.connect(node.results)
    sub.setsockopt(zmq.SUBSCRIBE, b"cam/pose")
    time.sleep(0.5)
    pub = Publisher(node.ingest, "cam")
    imgs = _frames(120)
    gaps_quiet, gaps_probe, last = [], [], None
    side = int(np.sqrt(budget)) // 16 * 16

    def pump(seconds: float, probing: bool, bucket: list) -> None:
        nonlocal last
        end, next_send, next_probe = time.monotonic() + seconds, time.monotonic(), time.monotonic() + 0.2
        i = 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_send:
                pub.send(imgs[i % len(imgs)])
                i += 1
                next_send += 1 / 15
            if probing and now >= next_probe:
                node.ctl.send_multipart(wire.encode_request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist(),
                                                            size=[side, side]))
                next_probe = now + 0.5
            while sub.poll(5):
                sub.recv_multipart()
                t = time.monotonic()
                if last is not None:
                    bucket.append(t - last)
                last = t
            while node.ctl.poll(0):
                node.ctl.recv_multipart()

    pump(3.0, False, gaps_quiet)
    pump(6.0, True, gaps_probe)
    over = node.request("query_raymap", stream_id="cam", T_wc=np.eye(4).tolist(), size=[2048, 2048])
    pub.close()
    sub.close(0)
    node.stop()
    return {"probe_size": [side, side], "longest_gap_ms_quiet": round(1e3 * max(gaps_quiet or [0]), 1),
            "longest_gap_ms_with_probes": round(1e3 * max(gaps_probe or [0]), 1),
            "probe_2048_refused": bool(over and not over.get("ok"))}


def attack_req(work: Path, weights: str, n: int = 30) -> dict:
    try:
        import imagezmq
    except ImportError:
        return {"skipped": "imagezmq is not installed"}
    node = NodeProcess(work / "req", weights)
    sender = imagezmq.ImageSender(connect_to=node.ingest)
    for img in _frames(n):
        sender.send_image("rpi", np.ascontiguousarray(img[..., ::-1]))
    st = (node.request("stats") or {}).get("streams", {}).get("rpi", {})
    sender.close()
    node.stop()
    return {"sent": n, "processed": st.get("processed"), "dropped": st.get("dropped"), "mode": st.get("mode")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tiny = _SHARED / "golden" / "tiny_dpt" / "checkpoint.pth"
    ap.add_argument("--weights", default=str(tiny) if tiny.exists() else "",
                    help="checkpoint of the node (default: the tiny golden one when ../shared is there, else bundled)")
    ap.add_argument("--fuzz", type=int, default=10000, help="malformed messages")
    ap.add_argument("--only", nargs="*", default=None, help="classes to run (fuzz paths bombs lossless stall req)")
    ap.add_argument("--probe-budget", type=int, default=512 * 512, help="the node's --max-probe-pixels")
    ap.add_argument("--json", help="write the report here too")
    args = ap.parse_args()
    runs = {"fuzz": lambda w: attack_fuzz(w, args.weights, args.fuzz), "paths": lambda w: attack_paths(w, args.weights),
            "bombs": lambda w: attack_bombs(w, args.weights), "lossless": lambda w: attack_lossless(w, args.weights),
            "stall": lambda w: attack_stall(w, args.weights, args.probe_budget),
            "req": lambda w: attack_req(w, args.weights)}
    report = {"weights": args.weights or "bundled"}
    with tempfile.TemporaryDirectory(prefix="attack-") as tmp:
        for name, fn in runs.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            work = Path(tmp) / name
            work.mkdir()
            try:
                report[name] = fn(work)
            except Exception as e:  # report and go on with the other classes
                report[name] = {"error": f"{type(e).__name__}: {e}"}
            report[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{name:9s} {json.dumps(report[name])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
