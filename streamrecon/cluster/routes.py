"""The gateway's bookkeeping: a frame on its way to a worker, a stream's route, a worker slot."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from ..wire import FrameMessage

__all__ = ["Forward", "Route", "WorkerSlot", "token_id", "token_of"]

#: how a frame's gateway token is written as the routing id the worker answers to
_TOKEN_PREFIX = b"\x00t"


def token_id(token: int) -> bytes:
    """The routing id a worker's acknowledgement of frame ``token`` comes back with."""
    return _TOKEN_PREFIX + token.to_bytes(8, "big")


def token_of(routing_id: bytes) -> Optional[int]:
    """:func:`token_id`'s inverse (``None``: not a gateway token)."""
    if len(routing_id) != 10 or not routing_id.startswith(_TOKEN_PREFIX):
        return None
    return int.from_bytes(routing_id[2:], "big")


@dataclass(eq=False)  # compared by identity (it is found in the replay buffer)
class Forward:
    """One accepted frame: its validated header, where its acknowledgement goes at the gateway
    (``envelope``; empty: nobody), and its payload (``payload``: ``(N,)`` uint8, a view of the received
    message; it goes to Ray's object store with the other frames of its exchange).

    ``token``: the gateway's number for it, increasing in the order frames are accepted. The worker
    sees the token as the frame's routing id and acknowledges every frame to it, so the gateway knows
    what each frame became (whatever its seq, or its sender's wish for an ack) and which frames a
    snapshot covers."""

    msg: FrameMessage
    envelope: list
    header: bytes
    payload: Any
    wants_ack: bool
    req_peer: bool
    token: int = 0
    status: Optional[str] = None  # the worker's last answer: received, processed, duplicate, ...

    @property
    def acked(self) -> bool:
        """Its sender heard it is done: a replay must not answer it again."""
        return self.status in ("processed", "duplicate")

    def for_worker(self) -> tuple:
        """``(envelope, header)`` as the worker receives them: the token as the routing id (a REQ peer's
        empty delimiter kept: the node treats REQ peers as it always does)."""
        return ([token_id(self.token), b""] if self.req_peer else [token_id(self.token)]), self.header


@dataclass
class Route:
    """One ``stream_id`` at the gateway: its worker (``None``: waiting for one), what the worker last
    reported, and what the stream went through (failovers, moves, frames lost or replayed).

    ``replay``: the frames sent since the stream's latest snapshot (lossless streams), in order -- what
    a new worker is given after the stream's snapshot if its worker dies. ``resend``: those frames, once
    the stream has a new worker, fed to it a lossless queue at a time. ``held``: frames that came while
    the stream had no worker (a failover, a move) or while its resend was under way; they follow it."""

    stream_id: str
    worker: Optional[str]
    lossless: Optional[bool] = None  # as the worker reported it (None: not yet known)
    moving: bool = False  # a drained worker is handing it over
    needs_adopt: bool = False  # the next worker must restore it from its latest snapshot first
    held: deque = field(default_factory=deque)
    replay: deque = field(default_factory=deque)
    resend: deque = field(default_factory=deque)
    processed: int = 0
    queue: int = 0
    fps: float = 0.0
    snapshot_frames: Optional[int] = None
    snapshot_token: Optional[int] = None  # the last frame the latest snapshot covers
    snapshot_name: Optional[str] = None  # the snapshot the replay follows (a new worker restores this one)
    restored_from: Optional[str] = None
    restored_frames: Optional[int] = None  # frames the stream held when it last continued on a new worker
    forwarded: int = 0
    failovers: int = 0
    moves: int = 0
    lost: int = 0  # frames processed before a failure that the continued stream does not hold
    replayed: int = 0
    dropped_in_flight: int = 0
    held_dropped: int = 0
    busy: int = 0
    requeued: int = 0  # replayed frames the new worker refused (busy) and were given again
    failed_at: Optional[float] = None
    expect_frames: Optional[int] = None
    recovery_s: Optional[float] = None
    status: dict = field(default_factory=dict)

    def brief(self) -> dict[str, Any]:
        return {"worker": self.worker, "moving": self.moving, "failovers": self.failovers, "moves": self.moves,
                "frames_lost": self.lost, "frames_replayed": self.replayed, "dropped_in_flight": self.dropped_in_flight,
                "held": len(self.held), "held_dropped": self.held_dropped, "busy_at_gateway": self.busy,
                "replay_requeued": self.requeued, "resend_waiting": len(self.resend),
                "replay_buffer": len(self.replay), "snapshot_frames": self.snapshot_frames,
                "restored_from": self.restored_from, "restored_frames": self.restored_frames,
                "last_recovery_s": self.recovery_s}


@dataclass
class WorkerSlot:
    """One worker actor as the gateway sees it. ``state``: starting, ready, draining, retired, dead."""

    name: str
    actor: Any
    ready_ref: Any
    replaces: Optional[str] = None
    state: str = "starting"
    info: dict = field(default_factory=dict)
    streams: set = field(default_factory=set)
    frames: list = field(default_factory=list)  # waiting for the next exchange
    control: list = field(default_factory=list)
    ops: list = field(default_factory=list)
    inflight: Any = None
    inflight_frames: list = field(default_factory=list)
    inflight_control: list = field(default_factory=list)
    inflight_ops: list = field(default_factory=list)
    sent_at: float = 0.0
    last_exchange: float = field(default_factory=time.monotonic)
    started: float = field(default_factory=time.monotonic)
    exchanges: int = 0
    frames_sent: int = 0
    exchange_s: float = 0.0
    work: bool = False
    stats: dict = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def takes_streams(self) -> bool:
        return self.state == "ready"

    @property
    def alive(self) -> bool:
        return self.state in ("starting", "ready", "draining")

    def status(self, routes: dict) -> dict[str, Any]:
        mine = [routes[s] for s in sorted(self.streams) if s in routes]
        return {"name": self.name, "state": self.state, "replaces": self.replaces, "streams": [r.stream_id for r in mine],
                "queue_depth": len(self.frames) + sum(r.queue for r in mine), "fps": round(sum(r.fps for r in mine), 3),
                "exchanges": self.exchanges, "frames_sent": self.frames_sent,
                "exchange_ms_mean": round(1e3 * self.exchange_s / self.exchanges, 3) if self.exchanges else None,
                "model_calls": self.stats.get("model_calls", 0), "batched_calls": self.stats.get("batched_calls", 0),
                "errors": self.stats.get("errors", 0), "internal_errors": self.stats.get("internal_errors", 0),
                **{k: self.info.get(k) for k in ("node_ip", "pid", "device", "gpus")}, "error": self.error}
