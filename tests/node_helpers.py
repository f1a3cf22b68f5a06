"""Run a node in a background thread and talk to it (tests only)."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import numpy as np
import zmq

from streamrecon import wire
from streamrecon.server import Node, ServeConfig

from .conftest import SHARED

_MODEL = None


def tiny_model():
    global _MODEL
    if _MODEL is None:
        from streamrecon.checkpoint import load_model

        _MODEL = load_model(SHARED / "golden" / "tiny_dpt" / "checkpoint.pth")
    return _MODEL


@contextlib.contextmanager
def running_node(tmp_path, **overrides) -> Iterator[Node]:
    cfg = dict(ingest="tcp://127.0.0.1:0", results="tcp://127.0.0.1:0", control="tcp://127.0.0.1:0", size=64,
               output_dir=str(tmp_path / "serve"), status_interval_s=0.2)
    cfg.update(overrides)
    node = Node(ServeConfig.of(**cfg), model=tiny_model())
    thread = threading.Thread(target=node.serve_forever, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        node.stop()
        thread.join(30)
        assert not thread.is_alive(), "node did not stop"


def free_endpoints() -> tuple[str, str, str]:
    """Three free loopback tcp endpoints (ingest, results, control) for a node started as a process."""
    import socket

    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return tuple(f"tcp://127.0.0.1:{p}" for p in ports)


def frames(n: int, seed: int = 0, hw=(48, 64)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (hw[0] + n, hw[1] + n, 3), dtype=np.uint8)
    return [np.ascontiguousarray(base[i:i + hw[0], i:i + hw[1]]) for i in range(n)]


class Client:
    """Control requests and result subscription against a running node."""

    def __init__(self, node: Node, curve=None) -> None:
        self.ctx = zmq.Context.instance()
        eps = node.endpoints
        self.ctl = self.ctx.socket(zmq.DEALER)
        self.sub = self.ctx.socket(zmq.SUB)
        for s in (self.ctl, self.sub):
            s.linger = 0
            if curve:
                from streamrecon.netsec import curve_client

                curve_client(s, *curve)
        self.ctl.connect(eps["control"])
        self.sub.connect(eps["results"])
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")

    def request(self, cmd: str, timeout: float = 20.0, **fields):
        # a DEALER with no peer (e.g. its CURVE handshake was refused and the pipe dropped) blocks in send:
        # no peer within the timeout is no reply
        if not self.ctl.poll(int(timeout * 1000), zmq.POLLOUT):
            return None, None
        try:
            self.ctl.send_multipart(wire.encode_request(cmd, **fields), flags=zmq.NOBLOCK)
        except zmq.Again:
            return None, None
        if not self.ctl.poll(int(timeout * 1000)):
            return None, None
        return wire.decode_reply(self.ctl.recv_multipart())

    def collect(self, until, timeout: float = 30.0) -> list:
        """Receive results until ``until(results)`` is true (or the timeout)."""
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline and not until(got):
            if self.sub.poll(100):
                got.append(wire.decode_result(self.sub.recv_multipart()))
        return got

    def close(self) -> None:
        self.ctl.close(0)
        self.sub.close(0)


def poses(results, stream=None) -> list:
    return [h for t, h, _ in results if t.endswith("/pose") and (stream is None or h["stream_id"] == stream)]


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
