"""The single node's logic inside a Ray worker: :class:`HostedNode` is :class:`~streamrecon.server.node.Node`
with in-memory sockets, stepped one :meth:`HostedNode.exchange` at a time by the gateway.

Everything a stream does -- acceptance (live newest-wins, lossless order and backpressure, duplicates),
batched stepping, results, control commands, snapshots, idle close -- is the node's own code: a frame's
ZeroMQ parts arrive as they left the camera (the gateway's routing envelope first), and the replies
and results the node would have sent are returned to the gateway, which sends them on its sockets.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from ..server.node import Node

__all__ = ["HostedNode", "Exchange", "StreamBrief", "MemorySocket"]

_logger = logging.getLogger(__name__)
#: (frames processed, routing id) pairs remembered per stream, to name the last frame a snapshot covers
_DONE_WINDOW = 8192


def _plain(part: Any) -> bytes:
    if isinstance(part, bytes):
        return part
    b = getattr(part, "bytes", None)  # a zmq.Frame
    return b if isinstance(b, bytes) else bytes(memoryview(part))


class MemorySocket:
    """The part of a ZeroMQ socket's interface the node uses: an inbox the gateway fills and an
    outbox of sent messages (``list[bytes]`` each) it takes back."""

    def __init__(self, zmq, name: str) -> None:
        self.zmq, self.name = zmq, name
        self.inbox: deque = deque()
        self.outbox: list[list[bytes]] = []

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list:
        if not self.inbox:
            raise self.zmq.Again()
        return self.inbox.popleft()

    def send_multipart(self, parts, flags: int = 0) -> None:
        self.outbox.append([_plain(p) for p in parts])

    def poll(self, timeout: int = 0, flags: int = 0) -> int:
        return self.zmq.POLLIN if self.inbox else 0

    def getsockopt(self, opt: int) -> bytes:
        return f"ray://{self.name}".encode()

    def take(self) -> list[list[bytes]]:
        out, self.outbox = self.outbox, []
        return out

    def close(self, linger: Optional[int] = None) -> None:
        pass


class _MemoryPoller:
    def __init__(self, zmq, sockets: list) -> None:
        self.zmq, self.sockets = zmq, sockets

    def poll(self, timeout: Optional[int] = None) -> list:
        return [(s, self.zmq.POLLIN) for s in self.sockets if s.inbox]


@dataclass(frozen=True)
class StreamBrief:
    """What the gateway needs of one stream after each exchange.

    ``snapshot_frames``/``snapshot_last``/``snapshot_name``: frames covered by the stream's latest
    snapshot, the routing id the last of them came with (the gateway's token for it) and its name
    (``None``: no snapshot yet, or that frame is no longer remembered)."""

    lossless: bool
    processed: int
    queue: int
    fps: float
    snapshot_frames: Optional[int]
    snapshot_last: Optional[bytes]
    snapshot_name: Optional[str]
    restored_from: Optional[str]


@dataclass(frozen=True)
class Exchange:
    """One exchange's output: messages for the gateway's ingest (acks), results and control sockets
    (each ``[envelope..., body...]`` as bytes), the streams now open, those closed during it, the
    outcome of each operation asked for, the node's counters, and whether work is left (frames
    queued, slow control requests running: the gateway asks again at once)."""

    ingest: list = field(default_factory=list)
    results: list = field(default_factory=list)
    control: list = field(default_factory=list)
    streams: dict = field(default_factory=dict)
    closed: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    work: bool = False


class HostedNode(Node):
    """:class:`Node` without sockets (see the module docstring). ``cfg``'s endpoints are not bound."""

    def __init__(self, cfg, model=None) -> None:
        self._done: dict[str, deque] = defaultdict(lambda: deque(maxlen=_DONE_WINDOW))
        super().__init__(cfg, model)

    def _open_sockets(self) -> None:
        zmq = self.zmq
        self.ingest, self.results, self.control = (MemorySocket(zmq, n) for n in ("ingest", "results", "control"))
        self.subs, self.auth = [], None
        self.poller = _MemoryPoller(zmq, [self.ingest, self.control])

    def _accept(self, msg, recv_ns: int, envelope, req_peer: bool) -> None:
        # the gateway hears what became of every frame (it tells the sender only what the sender asked for)
        if envelope is not None and not msg.ack:
            msg = replace(msg, ack=True)
        super()._accept(msg, recv_ns, envelope, req_peer)

    def _ack(self, p, status: str, error: str = "") -> None:
        if status == "processed" and p.reply_to:
            s = self.sessions.get(p.msg.stream_id)
            if s is not None:
                self._done[s.stream_id].append((s.processed, bytes(p.reply_to[0])))
        super()._ack(p, status, error)

    # ------------------------------------------------------------------------------------------
    # operations the gateway asks for (before the exchange's messages)

    def adopt(self, sid: str, lossless: bool, name: Optional[str] = None) -> dict[str, Any]:
        """Open stream ``sid`` here, continued from snapshot ``name`` (the one the gateway's replay
        follows), else from its latest good snapshot (a dead worker's or a drained one's), or new when
        it has none (or none loads)."""
        from ..snapshot import SnapshotError, read_latest_good, read_snapshot

        if sid in self.sessions:
            return {"op": "adopt", "stream_id": sid, "ok": True, "restored_from": self.sessions[sid].restored_from,
                    "frames": self.sessions[sid].processed}
        snap, error = None, None
        if name is not None:
            try:
                snap = read_snapshot(self.snapshots(sid).path_of(name))
            except SnapshotError as e:  # pruned or damaged: the latest good one (the gateway counts the mismatch)
                self.node_errors["restore_damaged"] += 1
                _logger.error("stream %s: snapshot %s cannot be read (%s); taking the latest good one", sid, name, e)
        if snap is None and self.snapshots(sid).names():
            try:
                snap, damaged = read_latest_good(self.snapshot_root(sid))
                for err in damaged:
                    self.node_errors["restore_damaged"] += 1
                    _logger.error("stream %s: snapshot passed over: %s", sid, err)
            except SnapshotError as e:
                self.node_errors["restore_failed"] += 1
                error = str(e)
        try:
            s = self.open_session(sid, lossless, snap)
        except Exception as e:  # e.g. the snapshot does not fit these settings: a new stream
            if snap is None:
                raise
            self.node_errors["restore_failed"] += 1
            error = str(e)
            s = self.open_session(sid, lossless, None)
        if error:
            _logger.error("stream %s: cannot restore (%s); continuing as a new stream", sid, error)
        return {"op": "adopt", "stream_id": sid, "ok": True, "restored_from": s.restored_from, "frames": s.processed,
                "error": error}

    def release(self, sid: str) -> dict[str, Any]:
        """Hand stream ``sid`` over (a drained worker): its waiting lossless frames are processed, a
        snapshot is written, then it closes here (its files written)."""
        s = self.sessions.get(sid)
        if s is None:
            return {"op": "release", "stream_id": sid, "ok": False, "open": False, "error": "no such stream here"}
        self._drain([s], self.cfg.drain_timeout_s)
        name = None
        if s.pipeline.snapshots is not None:
            name = s.pipeline.save_snapshot().name
        self.close_stream(sid, final_snapshot=False, drain=False)
        return {"op": "release", "stream_id": sid, "ok": True, "snapshot": name, "frames": s.processed}

    def _op(self, op: tuple) -> dict[str, Any]:
        kind, sid = op[0], op[1]
        try:
            if kind == "adopt":
                return self.adopt(sid, bool(op[2]), op[3] if len(op) > 3 else None)
            if kind == "release":
                return self.release(sid)
            return {"op": kind, "stream_id": sid, "ok": False, "error": f"unknown operation {kind!r}"}
        except Exception as e:
            self.counters["internal_errors"] += 1
            _logger.exception("stream %s: %s failed", sid, kind)
            return {"op": kind, "stream_id": sid, "ok": False, "open": sid in self.sessions, "failed": True,
                    "error": f"{type(e).__name__}: {e}"}

    # ------------------------------------------------------------------------------------------
    # the exchange

    def exchange(self, frames: list, control: list, ops: list = ()) -> Exchange:
        """``ops`` (``("adopt", sid, lossless)`` / ``("release", sid)``) first, then ``frames``
        (``[envelope..., header, payload]`` parts) and ``control`` requests (``[envelope..., body...]``)
        are received, and one loop iteration runs (at most one batched model step)."""
        zmq = self.zmq
        before = set(self.sessions)
        done = [self._op(op) for op in ops]
        for parts in frames:
            self.ingest.inbox.append([zmq.Frame(p) for p in parts])
        for parts in control:
            self.control.inbox.append([zmq.Frame(p) for p in parts])
        self.run_once(timeout_ms=0)
        return self._outbound(before, done)

    def close_all(self) -> Exchange:
        """Shut down like the node does (lossless frames processed, every stream flushed)."""
        before = set(self.sessions)
        self.close()
        return self._outbound(before, [])

    def _outbound(self, before: set, done: list) -> Exchange:
        closed = sorted(before - set(self.sessions))
        for sid in closed:
            self._done.pop(sid, None)
        work = bool(self.ingest.inbox or self.control.inbox or self._control_waiting
                    or any(s.queue for s in self.sessions.values()))
        return Exchange(ingest=self.ingest.take(), results=self.results.take(), control=self.control.take(),
                        streams={sid: self._brief(s) for sid, s in self.sessions.items()}, closed=closed, ops=done,
                        stats=self.stats(), work=work)

    def _brief(self, s) -> StreamBrief:
        latest = s.pipeline.snapshots.latest if s.pipeline.snapshots is not None else None
        name, frames = latest if latest is not None else (None, None)
        last = None
        if frames is not None:
            last = next((q for n, q in reversed(self._done[s.stream_id]) if n == frames), None)
        return StreamBrief(lossless=s.lossless, processed=s.processed, queue=len(s.queue), fps=round(s.pipeline.fps(), 3),
                           snapshot_frames=frames, snapshot_last=last,
                           snapshot_name=name if frames is not None else None, restored_from=s.restored_from)
