"""The ZeroMQ node: many camera streams in, poses and geometry out, a control channel on the side.

Sockets (all bound by the node, loopback by default):

* ingest ROUTER -- frames from our DEALER/REQ clients and from imagezmq ``ImageSender`` (REQ mode);
  optional SUB sockets connect to imagezmq senders in PUB mode;
* results PUB -- ``<stream>/pose``, ``<stream>/geometry``, ``<stream>/status`` (never blocks: a slow
  or absent subscriber only loses messages);
* control ROUTER -- JSON request/reply (:mod:`.control`).

One loop thread owns every socket: it drains the ingest queue into per-stream queues (a live stream
keeps only its newest frame; a lossless one queues in order and is acknowledged only once processed,
which is the backpressure), answers control requests, and steps every stream with a frame ready --
several streams in one batched model call. Bad messages are counted (per stream when the header named
one) and never stop the loop.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from ..engine import Frame, process_batch
from ..fileio import UnsafePathError, atomic_write_text, confine
from ..pipeline import LoadedModel, build_pipeline, engine_config, load_resolved
from ..sinks.zmq_results import ResultPublisher
from ..wire import FrameMessage, WireError, decode_frame, encode_reply, encode_result
from .config import ServeConfig
from .session import Pending, StreamSession
from .sockets import open_node_sockets, send_nowait, split_envelope

__all__ = ["Node"]

_logger = logging.getLogger(__name__)
_ACK_OK = b"OK"
#: a lossless frame refused as busy holds back the frames after it until it is sent again -- for this long
REFUSED_FORGET_S = 10.0
#: slow control requests (probes, map writes) that may wait for the control worker at once
CONTROL_WAITING_MAX = 4
#: how long the last acknowledgements may take to leave when the node closes
SHUTDOWN_LINGER_MS = 500
#: sequence numbers of a publisher session remembered to tell resends (duplicates) from frames never seen
SEQ_WINDOW = 4096


class Node:
    """Args:
        cfg: node settings (validated here).
        model: a loaded model (or :class:`LoadedModel`) shared by all streams (else the settings'
            weights, or the bundled model, are loaded).

    Each stream gets its own :class:`StreamPipeline` built from ``cfg.pipeline`` (the same code path
    as ``streamrecon run``): files under ``<output-dir>/streams/<id>/``, the result publisher, and,
    with ``--viewer``/``--save-rrd``, a subtree ``streams/<id>/`` of one shared Rerun recording.
    """

    def __init__(self, cfg: ServeConfig, model=None) -> None:
        import zmq

        cfg.validate()
        self.cfg = cfg
        self.loaded = LoadedModel.wrap(model) if model is not None else load_resolved(cfg.pipeline.engine)
        self.model = self.loaded.model
        self.engine_cfg = engine_config(cfg.pipeline.engine, self.model)
        self.output_dir = Path(cfg.pipeline.outputs.output_dir)
        self.recording = None
        self.sessions: dict[str, StreamSession] = {}
        self.node_errors: Counter = Counter()  # messages that named no (valid) stream
        self.counters: Counter = Counter()
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._draining = False  # shutting down: frames already accepted are processed, new ones refused
        self._control_worker = None  # a one-thread pool for slow control work (probes, map writes)
        self._control_replies: queue.SimpleQueue = queue.SimpleQueue()  # (envelope, parts) the worker finished
        self._control_waiting = 0
        self._rr = 0
        self._last_status = 0.0

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.auth = None
        try:
            self._open_sockets()
            o = cfg.pipeline.outputs
            if o.viewer != "none" or o.save_rrd:
                from ..pipeline.build import rerun_config
                from ..sinks.rerun_sink import RerunRecording

                self.recording = RerunRecording(rerun_config(cfg.pipeline, "streamrecon-serve"), multi_stream=True)
        except Exception:
            self.ctx.destroy(linger=0)
            raise

    # ------------------------------------------------------------------------------------------
    # sockets

    def _open_sockets(self) -> None:
        socks = open_node_sockets(self.zmq, self.ctx, self.cfg)
        self.ingest, self.results, self.control = socks.ingest, socks.results, socks.control
        self.subs, self.poller, self.auth = socks.subs, socks.poller, socks.auth

    @property
    def endpoints(self) -> dict[str, str]:
        """Actual bound endpoints (resolves ``:0`` / ``*`` ports)."""
        return {n: getattr(self, n).getsockopt(self.zmq.LAST_ENDPOINT).decode() for n in ("ingest", "results", "control")}

    # ------------------------------------------------------------------------------------------
    # loop

    def stop(self) -> None:
        """Ask the loop to finish (thread-safe); outputs are flushed on the way out."""
        self._stop.set()

    def serve_forever(self) -> None:
        """Run until :meth:`stop` (or a ``shutdown`` request); then flush every stream and close."""
        try:
            while not self._stop.is_set():
                self.run_once(timeout_ms=50)
        finally:
            self.close()

    def run_once(self, timeout_ms: int = 50) -> None:
        """One loop iteration: receive, answer control, step ready streams, housekeeping."""
        self._send_control_replies()
        frames_waiting = any(s.queue for s in self.sessions.values())
        # a control reply on its way is looked for soon (the worker cannot wake the poller)
        wait = 0 if frames_waiting else min(timeout_ms, 5) if self._control_waiting else timeout_ms
        events = dict(self.poller.poll(wait))
        for sock in events:
            try:
                if sock is self.control:
                    self._drain_control()
                else:
                    self._drain_ingest(sock, router=sock is self.ingest)
            except Exception:  # never let one message take the node down
                self.counters["internal_errors"] += 1
                _logger.exception("error while receiving")
        try:
            self._step_ready()
        except Exception:
            self.counters["internal_errors"] += 1
            _logger.exception("error while stepping streams")
        try:
            self._housekeeping()
        except Exception:
            self.counters["internal_errors"] += 1
            _logger.exception("error in the node's housekeeping")

    # ------------------------------------------------------------------------------------------
    # ingest

    def _drain_ingest(self, sock, router: bool) -> None:
        zmq = self.zmq
        for _ in range(512):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            recv_ns = time.time_ns()
            self.counters["messages"] += 1
            envelope, req_peer = None, False
            if router:  # the peer's routing id, as bytes (compared when a resend comes from another peer)
                envelope, req_peer, parts = split_envelope(parts)
            try:
                msg = decode_frame(parts, self.cfg.max_message_bytes)
            except WireError as e:
                self._count_error(e.stream_id, e.kind)
                if envelope is not None:  # every peer that can hear back does (a DEALER would resend forever)
                    self._send(self.ingest, envelope + [self._ack_body(None, "rejected", str(e), e.stream_id, e.seq)])
                continue
            self._accept(msg, recv_ns, envelope, req_peer)

    def _count_error(self, stream_id: Optional[str], kind: str) -> None:
        s = self.sessions.get(stream_id) if stream_id else None
        if s is not None:
            s.errors[kind] += 1
        else:
            self.node_errors[kind] += 1

    @staticmethod
    def _ack_body(msg: Optional[FrameMessage], status: str, error: str = "", stream_id: Optional[str] = None,
                  seq: Optional[int] = None) -> bytes:
        if msg is not None and msg.origin == "imagezmq":
            return _ACK_OK if status in ("received", "processed") else f"ERROR {error}".encode()[:512]
        body: dict[str, Any] = {"v": 1, "status": status}
        if msg is not None:
            body.update(stream_id=msg.stream_id, seq=msg.seq)
        else:
            body.update({k: v for k, v in (("stream_id", stream_id), ("seq", seq)) if v is not None})
        if error:
            body["error"] = error[:500]
        return json.dumps(body).encode()

    def _send(self, sock, parts: list) -> None:
        send_nowait(self.zmq, sock, parts, self.counters)

    def _reply(self, envelope: Optional[list], msg: FrameMessage, status: str, error: str = "") -> None:
        if envelope is not None:
            self._send(self.ingest, envelope + [self._ack_body(msg, status, error)])

    def _new_session(self, msg: FrameMessage, req_peer: bool) -> StreamSession:
        # a REQ peer has one frame in flight and waits for its reply: lossless costs it nothing and loses nothing
        default = True if req_peer else self.cfg.lossless
        lossless = default if msg.lossless is None else msg.lossless
        snap = None
        if self.cfg.restore and self.snapshots(msg.stream_id).names():
            from ..snapshot import SnapshotError, read_latest_good

            try:  # the newest snapshot that loads (a damaged newest one is passed over, logged)
                snap, damaged = read_latest_good(self.snapshot_root(msg.stream_id))
                for err in damaged:
                    self.node_errors["restore_damaged"] += 1
                    _logger.error("stream %s: snapshot passed over: %s", msg.stream_id, err)
            except SnapshotError as e:  # none loads: the stream starts afresh; the snapshots are left where they are
                self.node_errors["restore_failed"] += 1
                _logger.error("stream %s: cannot restore (%s); starting a new stream", msg.stream_id, e)
        if snap is not None:
            try:
                return self.open_session(msg.stream_id, lossless, snap)
            except UnsafePathError:
                raise
            except Exception as e:  # e.g. the snapshot does not fit these settings
                self.node_errors["restore_failed"] += 1
                _logger.error("stream %s: cannot restore (%s); starting a new stream", msg.stream_id, e)
        return self.open_session(msg.stream_id, lossless, None)

    def snapshot_root(self, stream_id: str) -> Path:
        return confine(self.output_dir, self.output_dir / "snapshots" / stream_id)

    def snapshots(self, stream_id: str):
        from ..snapshot import SnapshotStore

        return SnapshotStore(self.snapshot_root(stream_id), keep=self.cfg.pipeline.outputs.snapshot_keep,
                             boundary=self.output_dir)

    def _set_aside_earlier_outputs(self, sid: str) -> None:
        """A stream opening under an id whose folder holds an earlier stream's outputs (an idle close, a
        node restart, a snapshot it continues from): that folder moves to
        ``<output-dir>/previous/<id>-<UTC time>/`` -- kept, never overwritten, never mixed with the new files."""
        from ..sinks.output_dir import earlier_outputs

        d = self.stream_dir(sid)
        found = earlier_outputs(d)
        if not found:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = confine(self.output_dir, self.output_dir / "previous" / f"{sid}-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.output_dir / "previous" / f"{sid}-{stamp}-{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        d.rename(target)
        _logger.warning("stream %s: a new stream under this id; the earlier stream's outputs (%s) moved to %s",
                        sid, ", ".join(found), target)

    def open_session(self, sid: str, lossless: bool, snapshot=None) -> StreamSession:
        """A new stream (its pipeline, publisher and snapshotter), continued from ``snapshot`` when given
        (everything restored, or -- :class:`~streamrecon.snapshot.SnapshotError` -- no session made).
        Raises :class:`~streamrecon.fileio.UnsafePathError` when the stream's folder leads outside the
        output directory (a planted symlink)."""
        o = self.cfg.pipeline.outputs
        directory, snapshot_dir = self.stream_dir(sid), self.snapshot_root(sid)  # both checked before anything
        self._set_aside_earlier_outputs(sid)
        publisher = ResultPublisher(lambda parts: self._send(self.results, parts), sid,
                                    geometry_stride=self.cfg.geometry_stride, map_points=self.cfg.pipeline.map.map_points)
        pipeline = build_pipeline(self.cfg.pipeline, self.loaded, stream_id=sid, output_dir=directory,
                                  extra_sinks=[publisher], recording=self.recording, prefix=f"streams/{sid}/",
                                  describe={"source": f"serve:{sid}", "output_dir": str(directory),
                                            "config": self.cfg.flat(), "checkpoint": self.loaded.info.describe()},
                                  # save_snapshot works on every stream; automatic ones (periodic, at close)
                                  # with --snapshot-every
                                  snapshot_dir=snapshot_dir, snapshot_at_close=bool(o.snapshot_every),
                                  root=self.output_dir)
        if snapshot is not None:
            try:
                pipeline.restore(snapshot)
            except BaseException:
                pipeline.discard()  # nothing written: the stream's earlier outputs stay as they are
                raise
        s = StreamSession(stream_id=sid, pipeline=pipeline, publisher=publisher, lossless=lossless,
                          restored_from=None if snapshot is None else snapshot.path.name)
        self.sessions[sid] = s
        _logger.info("stream %s opened (%s)%s", sid, "lossless" if lossless else "live",
                     f", continued from snapshot {snapshot.path.name} ({pipeline.processed} frames)" if snapshot else "")
        return s

    def _open_for(self, msg: FrameMessage, envelope: Optional[list], req_peer: bool):
        """``(session, decoded image)`` a frame of an unknown stream opens -- only when there is room,
        the node is not shutting down, and the frame itself decodes (junk never holds a stream slot);
        else ``None`` (counted, answered)."""
        def refuse(kind: str, status: str, error: str) -> None:
            self.node_errors[kind] += 1
            self._reply(envelope, msg, status, error)

        if self._draining:
            refuse("refused_shutting_down", "busy", "the node is shutting down; send again later")
            return None
        if len(self.sessions) >= self.cfg.max_streams:
            refuse("too_many_streams", "rejected", "too many streams")
            return None
        try:
            image = msg.image()
        except WireError as e:
            refuse(e.kind, "rejected", str(e))
            return None
        try:
            s = self._new_session(msg, req_peer)
        except UnsafePathError as e:
            refuse("unsafe_path", "rejected", "the stream's folder cannot be written")
            _logger.error("stream %s refused: %s", msg.stream_id, e)
            return None
        return s, image

    def _accept(self, msg: FrameMessage, recv_ns: int, envelope: Optional[list], req_peer: bool) -> None:
        wants_ack = envelope is not None and (req_peer or msg.ack)
        reply_to = envelope if wants_ack else None
        s, image = self.sessions.get(msg.stream_id), None
        if s is None:
            opened = self._open_for(msg, reply_to, req_peer)
            if opened is None:
                return
            s, image = opened
        s.received += 1
        s.last_activity = time.monotonic()
        if msg.lossless is not None:
            s.lossless = msg.lossless
        if msg.seq is None:
            msg.seq = s.next_seq
        if msg.session != s.publisher_session:
            if s.publisher_session is not None:
                _logger.info("stream %s: publisher restarted (session %s)", s.stream_id, msg.session)
            s.publisher_session, s.last_seq, s.refused_from = msg.session, None, None
            s.taken.clear()
        if msg.session is not None and (msg.seq in s.taken or (s.last_seq is not None and msg.seq <= s.last_seq - SEQ_WINDOW)):
            s.duplicates += 1  # a resend after a lost ack (or from a socket that reconnected)
            self._duplicate(s, msg, reply_to)
            return
        if s.lossless:
            # in order, nothing lost: a frame refused as busy is the next one taken; everything after
            # it is refused too until it comes again (the publisher resends in order)
            full = len(s.queue) >= self.cfg.lossless_queue
            if s.refused_from is not None and time.monotonic() - s.refused_at > REFUSED_FORGET_S:
                s.refused_from = None  # the publisher never sent it again: it gave that frame up
            if self._draining or full or (s.refused_from is not None and msg.seq > s.refused_from):
                s.busy += 1
                # only a sender that hears "busy" sends again; only its frames hold the later ones back
                if reply_to is not None and msg.session is not None and \
                        (s.refused_from is None or msg.seq <= s.refused_from):
                    s.refused_from, s.refused_at = msg.seq, time.monotonic()
                self._reply(reply_to, msg, "busy", "the node is shutting down" if self._draining else
                            "lossless queue full" if full else f"waiting for frame {s.refused_from} first")
                return
            s.refused_from = None
            self._take(s, msg, Pending(msg, recv_ns, reply_to, image))
            return
        if self._draining:
            s.dropped += 1
            self._reply(reply_to, msg, "dropped", "the node is shutting down")
            return
        while s.queue:  # newest wins; a frame someone waits on (a REQ peer, a lossless frame before a flip) hears so
            self._drop(s, s.queue.pop(), "replaced by a newer frame (live stream)")
        self._take(s, msg, Pending(msg, recv_ns, None, image))
        self._reply(reply_to, msg, "received")

    @staticmethod
    def _take(s: StreamSession, msg: FrameMessage, p: Pending) -> None:
        s.queue.append(p)
        if msg.session is not None and s.last_seq is not None and msg.seq < s.last_seq:
            s.late += 1  # never taken, older than one that was (it was lost on the way, e.g. by a node before
            # this one): processed now, out of order, rather than lost
        if msg.session is not None:
            s.last_seq = msg.seq if s.last_seq is None else max(s.last_seq, msg.seq)
            s.taken.add(msg.seq)
            if len(s.taken) > 2 * SEQ_WINDOW:  # remembered: the newest SEQ_WINDOW sequence numbers
                s.taken = {q for q in s.taken if q > s.last_seq - SEQ_WINDOW}
        s.next_seq = max(s.next_seq, msg.seq + 1)

    def _drop(self, s: StreamSession, p: Pending, reason: str) -> None:
        """A taken frame that will not be processed: counted, acked ``dropped`` (the sender may send it
        again: it is forgotten, so that copy is taken rather than called a duplicate)."""
        s.dropped += 1
        if p.msg.session is not None and p.msg.session == s.publisher_session:
            s.taken.discard(p.msg.seq)
        self._ack(p, "dropped", reason)

    def _duplicate(self, s: StreamSession, msg: FrameMessage, reply_to: Optional[list]) -> None:
        """A frame taken before: still waiting -> its final ack goes to this (newest) peer; already
        done -> ``duplicate`` (it was processed or rejected before; nothing to resend)."""
        for p in s.queue:
            if p.msg.seq == msg.seq and p.msg.session == msg.session:
                if reply_to is not None and p.reply_to != reply_to:
                    if p.reply_to is not None and len(p.reply_to) == 2:  # a REQ peer waits for an answer
                        self._send(self.ingest, p.reply_to + [self._ack_body(p.msg, "duplicate")])
                    p.reply_to = reply_to
                return
        self._reply(reply_to, msg, "duplicate")

    # ------------------------------------------------------------------------------------------
    # stepping

    def _step_ready(self, only: Optional[list[StreamSession]] = None) -> None:
        ready = [s for s in (self.sessions.values() if only is None else only) if s.queue]
        if not ready:
            return
        self._rr = (self._rr + 1) % len(ready)
        ready = (ready[self._rr:] + ready[: self._rr])[: self.cfg.max_batch]
        items = []
        for s in ready:
            p = s.queue.popleft()
            try:
                rgb = p.image if p.image is not None else p.msg.image()
            except WireError as e:
                s.errors[e.kind] += 1
                self._ack(p, "rejected", str(e))
                continue
            try:
                frame = s.pipeline.prepare(Frame(image=rgb, seq=p.msg.seq, stamp=p.msg.stamp_ns / 1e9,
                                                 source=s.stream_id, K=p.msg.K))
            except ValueError as e:  # e.g. a frame size the calibration does not fit
                s.errors["bad_frame"] += 1
                s.pipeline.record_error(f"frame {p.msg.seq}: {e}")
                self._ack(p, "rejected", str(e))
                continue
            if p.msg.reset:
                s.engine.reset(keep_trajectory=True)
            items.append((s, p, frame))
        if not items:
            return
        self.counters["model_calls"] += 1
        self.counters["max_batch_seen"] = max(self.counters["max_batch_seen"], len(items))
        if len(items) > 1:
            self.counters["batched_calls"] += 1
            results = process_batch([s.engine for s, _, _ in items], [f for _, _, f in items])
        else:
            s, _, f = items[0]
            try:
                results = [s.engine.process(f)]
            except Exception as e:
                results = [e]
        for (s, p, f), r in zip(items, results):
            if isinstance(r, Exception):
                s.errors["processing"] += 1
                s.pipeline.record_error(f"frame {p.msg.seq}: {r}")
                self._ack(p, "rejected", str(r))
                continue
            try:
                s.pipeline.consume(r, context={"recv_ns": p.recv_ns, "stamp_ns": p.msg.stamp_ns}, frame=f)
            except Exception as e:  # the stream's stage or map failed on this frame: count it, go on
                s.errors["processing"] += 1
                s.pipeline.record_error(f"frame {p.msg.seq}: {e}")
                self._ack(p, "rejected", str(e))
                continue
            self.counters["published"] += 1
            self._ack(p, "processed")

    def _ack(self, p: Pending, status: str, error: str = "") -> None:
        if p.reply_to is not None:
            self._send(self.ingest, p.reply_to + [self._ack_body(p.msg, status, error)])

    # ------------------------------------------------------------------------------------------
    # control, status, shutdown

    def _drain_control(self) -> None:
        from .control import Deferred, handle_request

        zmq = self.zmq
        for _ in range(64):
            try:
                parts = self.control.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(parts) >= 2 and len(parts[1].buffer) == 0:
                envelope, body = [parts[0], b""], parts[2:]
            else:
                envelope, body = [parts[0]], parts[1:]
            reply = handle_request(self, body)
            if isinstance(reply, Deferred):
                self._defer(envelope, reply)
            else:
                self._send(self.control, envelope + reply)

    def _defer(self, envelope: list, d) -> None:
        """Run a command's slow part in the control worker; its reply is sent by the loop when ready.
        At most :data:`CONTROL_WAITING_MAX` wait: more are answered at once with an error."""
        from concurrent.futures import ThreadPoolExecutor

        from .control import run_deferred

        if self._control_waiting >= CONTROL_WAITING_MAX:
            self.counters["control_errors"] += 1
            self._send(self.control, envelope + encode_reply(
                False, cmd=d.cmd, error=f"{self._control_waiting} slow requests are waiting; try again later"))
            return
        if self._control_worker is None:
            self._control_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamrecon-control")
        self._control_waiting += 1

        def job() -> None:
            self._control_replies.put((envelope, *run_deferred(d)))

        self._control_worker.submit(job)

    def _send_control_replies(self) -> None:
        while True:
            try:
                envelope, parts, failed = self._control_replies.get_nowait()
            except queue.Empty:
                return
            self._control_waiting -= 1
            self.counters["control_errors"] += failed  # counted here: the loop thread owns the counters
            self._send(self.control, envelope + parts)

    def stats(self) -> dict[str, Any]:
        return {"uptime_s": round(time.monotonic() - self.started, 3), "streams": len(self.sessions),
                "messages": self.counters["messages"], "published": self.counters["published"],
                "send_dropped": self.counters["send_dropped"], "internal_errors": self.counters["internal_errors"],
                "control_errors": self.counters["control_errors"], "close_errors": self.counters["close_errors"],
                "write_errors": self.counters["write_errors"], "model_calls": self.counters["model_calls"],
                "batched_calls": self.counters["batched_calls"], "max_batch_seen": self.counters["max_batch_seen"],
                "errors_by_kind": dict(self.node_errors), "errors": sum(self.node_errors.values()),
                "endpoints": self.endpoints, "batch": self.cfg.max_batch, "size": self.engine_cfg.size,
                "policy": self.engine_cfg.policy}

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_status >= self.cfg.status_interval_s:
            self._last_status = now
            for s in self.sessions.values():
                self._send(self.results, encode_result(s.stream_id, "status", s.status()))
            self._send(self.results, [b"_node/status", *encode_result("_node", "status", self.stats())[1:]])
        for s in self.sessions.values():  # a stream that pauses still gets its periodic flush and map
            try:
                s.pipeline.flush_if_due()
            except Exception as e:
                self.counters["write_errors"] += 1
                _logger.error("stream %s: periodic flush failed: %s", s.stream_id, e)
        for sid, s in list(self.sessions.items()):
            if not s.queue and now - s.last_activity > self.cfg.idle_timeout_s:
                _logger.info("stream %s idle for %.0f s: closing", sid, now - s.last_activity)
                try:
                    self.close_stream(sid)
                except Exception:  # e.g. its folder went away: the stream is gone, the node serves on
                    self.counters["close_errors"] += 1
                    _logger.exception("stream %s: closing after the idle timeout failed", sid)

    def stream_dir(self, stream_id: str) -> Path:
        """``<output-dir>/streams/<id>`` (:class:`~streamrecon.fileio.UnsafePathError` if a symlink leads it out)."""
        return confine(self.output_dir, self.output_dir / "streams" / stream_id)

    def _drain(self, sessions: list[StreamSession], timeout_s: float) -> None:
        """Step ``sessions`` until their lossless queues are empty or ``timeout_s`` passes (shutdown, close):
        frames the node accepted are processed, not dropped. Live frames waiting are dropped."""
        deadline = time.monotonic() + timeout_s
        for s in sessions:
            if not s.lossless:
                while s.queue:
                    self._drop(s, s.queue.pop(), "stream closed")
        pending = [s for s in sessions if s.queue]
        if pending:
            _logger.info("processing %d waiting lossless frames of %d streams before closing",
                         sum(len(s.queue) for s in pending), len(pending))
        while any(s.queue for s in pending) and time.monotonic() < deadline:
            try:
                self._step_ready(only=pending)
            except Exception:
                self.counters["internal_errors"] += 1
                _logger.exception("error while draining streams")
                break

    def _answer_waiting(self) -> None:
        """Shutting down: the frames still waiting in the ingest socket are answered (``busy``: send
        again, to the next node) -- a REQ sender never resends on its own, so it must hear back."""
        for _ in range(64):
            if not self.ingest.poll(0):
                return
            try:
                self._drain_ingest(self.ingest, router=True)
            except Exception:
                self.counters["internal_errors"] += 1
                _logger.exception("error while answering frames at shutdown")
                return

    def close_stream(self, stream_id: str, final_snapshot: bool = True, drain: bool = True) -> list[str]:
        """Close a stream: its waiting lossless frames are processed first (``drain``; at most
        ``--drain-timeout-s``), then its pipeline closes (its sinks write trajectory, map, summary;
        with ``--snapshot-every`` a last snapshot) and the node forgets it."""
        s = self.sessions.get(stream_id)
        if s is None:
            raise KeyError(stream_id)
        if drain:
            self._drain([s], self.cfg.drain_timeout_s)
        self.sessions.pop(stream_id, None)
        if not final_snapshot and s.pipeline.snapshots is not None:
            from dataclasses import replace

            s.pipeline.snapshots.policy = replace(s.pipeline.snapshots.policy, at_close=False)
        while s.queue:  # only what the drain timeout left: the publisher sends these again
            self._drop(s, s.queue.popleft(), "stream closed before this frame was processed")
        summary = s.pipeline.close(stop_reason="stream closed")
        status = {**s.status(), "closed": True}
        directory = self.output_dir / "streams" / stream_id
        try:
            directory = self.stream_dir(stream_id)
            atomic_write_text(confine(self.output_dir, directory / "status.json"), json.dumps(status, indent=1) + "\n")
        except OSError as e:
            self.counters["write_errors"] += 1
            _logger.error("stream %s: could not write status.json: %s", stream_id, e)
        self._send(self.results, encode_result(stream_id, "status", status))
        return [str(directory / n) for n in summary.extra.get("outputs", [])] + [str(directory / "status.json")]

    def close(self) -> None:
        """Shut down: new frames are refused (``busy``: a lossless publisher sends them again to the next
        node), the lossless frames already accepted are processed (at most ``--drain-timeout-s``), every
        stream is flushed (atomically written files), then the sockets close."""
        self._draining = True
        if self._control_worker is not None:  # the probes and map writes under way finish and are answered
            self._control_worker.shutdown(wait=True)
            self._send_control_replies()
        self._drain(list(self.sessions.values()), self.cfg.drain_timeout_s)
        self._answer_waiting()
        for sid in list(self.sessions):
            try:
                self.close_stream(sid, drain=False)
            except Exception:
                self.counters["close_errors"] += 1
                _logger.exception("could not flush stream %s", sid)
        if self.recording is not None:
            self.recording.close()
        self._answer_waiting()  # what came while the streams were closing (no session now: busy)
        self.ingest.close(linger=SHUTDOWN_LINGER_MS)  # the last acks leave before the socket goes
        for sock in (self.results, self.control, *self.subs):
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
