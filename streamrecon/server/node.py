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
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from ..engine import Frame, process_batch
from ..fileio import atomic_write_text
from ..pipeline import LoadedModel, build_pipeline, engine_config, load_resolved
from ..settings import SettingsError
from ..sinks.zmq_results import ResultPublisher
from ..wire import FrameMessage, WireError, decode_frame, encode_result
from .config import ServeConfig, is_loopback_endpoint
from .session import Pending, StreamSession

__all__ = ["Node"]

_logger = logging.getLogger(__name__)
_ACK_OK = b"OK"


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

    def _secure(self, sock) -> None:
        if self.cfg.curve_secret_key:
            sock.curve_secretkey = self._secret
            sock.curve_publickey = self._public
            sock.curve_server = True

    def _open_sockets(self) -> None:
        zmq, cfg = self.zmq, self.cfg
        if cfg.curve_secret_key:
            import zmq.auth
            from zmq.auth.thread import ThreadAuthenticator

            self._public, self._secret = zmq.auth.load_certificate(cfg.curve_secret_key)
            if self._secret is None:
                raise SettingsError(f"{cfg.curve_secret_key} holds no secret key")
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(cfg.curve_clients))
        elif any(not is_loopback_endpoint(getattr(cfg, n)) for n in ("ingest", "results", "control")):
            _logger.warning("the node listens beyond loopback WITHOUT authentication; use --curve-secret-key")

        def bind(kind: int, endpoint: str, name: str):
            sock = self.ctx.socket(kind)
            sock.linger = 0
            self._secure(sock)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as e:
                sock.close()
                raise SettingsError(f"cannot bind the {name} socket to {endpoint}: {e}") from None
            return sock

        self.ingest = bind(zmq.ROUTER, cfg.ingest, "ingest")
        self.ingest.rcvhwm = 64
        self.ingest.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
        self.results = bind(zmq.PUB, cfg.results, "results")
        self.results.sndhwm = 256
        self.control = bind(zmq.ROUTER, cfg.control, "control")
        self.control.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        self.subs = []
        for ep in cfg.subscribe:
            sub = self.ctx.socket(zmq.SUB)
            sub.linger = 0
            sub.rcvhwm = 8
            sub.setsockopt(zmq.MAXMSGSIZE, cfg.max_message_bytes)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(ep)
            self.subs.append(sub)
        self.poller = zmq.Poller()
        for sock in (self.ingest, self.control, *self.subs):
            self.poller.register(sock, zmq.POLLIN)

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
        busy = any(s.queue for s in self.sessions.values())
        events = dict(self.poller.poll(0 if busy else timeout_ms))
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
        self._housekeeping()

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
            if router:
                if len(parts) >= 2 and len(parts[1].buffer) == 0:  # REQ peer: [id, b"", ...]
                    envelope, req_peer, parts = [parts[0], b""], True, parts[2:]
                else:
                    envelope, parts = [parts[0]], parts[1:]
            try:
                msg = decode_frame(parts, self.cfg.max_message_bytes)
            except WireError as e:
                self._count_error(e.stream_id, e.kind)
                if req_peer:  # a REQ client blocks until it hears back
                    self._send(self.ingest, envelope + [self._ack_body(None, "rejected", str(e))])
                continue
            self._accept(msg, recv_ns, envelope, req_peer)

    def _count_error(self, stream_id: Optional[str], kind: str) -> None:
        s = self.sessions.get(stream_id) if stream_id else None
        if s is not None:
            s.errors[kind] += 1
        else:
            self.node_errors[kind] += 1

    @staticmethod
    def _ack_body(msg: Optional[FrameMessage], status: str, error: str = "") -> bytes:
        if msg is not None and msg.origin == "imagezmq":
            return _ACK_OK if status in ("received", "processed") else f"ERROR {error}".encode()[:512]
        import json

        body = {"v": 1, "status": status}
        if msg is not None:
            body.update(stream_id=msg.stream_id, seq=msg.seq)
        if error:
            body["error"] = error[:500]
        return json.dumps(body).encode()

    def _send(self, sock, parts: list) -> None:
        try:
            sock.send_multipart(parts, flags=self.zmq.NOBLOCK)
        except self.zmq.Again:
            self.counters["send_dropped"] += 1
        except self.zmq.ZMQError as e:  # e.g. the peer is gone
            self.counters["send_errors"] += 1
            _logger.debug("send failed: %s", e)

    def _new_session(self, msg: FrameMessage) -> Optional[StreamSession]:
        if len(self.sessions) >= self.cfg.max_streams:
            return None
        lossless = self.cfg.lossless if msg.lossless is None else msg.lossless
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
        try:
            return self.open_session(msg.stream_id, lossless, snap)
        except Exception as e:  # e.g. the snapshot does not fit these settings
            self.node_errors["restore_failed"] += 1
            _logger.error("stream %s: cannot restore (%s); starting a new stream", msg.stream_id, e)
            return self.open_session(msg.stream_id, lossless, None)

    def snapshot_root(self, stream_id: str) -> Path:
        return self.output_dir / "snapshots" / stream_id

    def snapshots(self, stream_id: str):
        from ..snapshot import SnapshotStore

        return SnapshotStore(self.snapshot_root(stream_id), keep=self.cfg.pipeline.outputs.snapshot_keep)

    def _set_aside_earlier_outputs(self, sid: str) -> None:
        """A new stream under an id whose folder holds an earlier stream's outputs: that folder moves
        to ``<output-dir>/previous/<id>-<UTC time>/`` (kept, never mixed with the new stream's files)."""
        from ..sinks.output_dir import earlier_outputs

        d = self.stream_dir(sid)
        found = earlier_outputs(d)
        if not found:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.output_dir / "previous" / f"{sid}-{stamp}"
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
        (everything restored, or -- :class:`~streamrecon.snapshot.SnapshotError` -- no session made)."""
        o = self.cfg.pipeline.outputs
        if snapshot is None:
            self._set_aside_earlier_outputs(sid)
        publisher = ResultPublisher(lambda parts: self._send(self.results, parts), sid,
                                    geometry_stride=self.cfg.geometry_stride, map_points=self.cfg.pipeline.map.map_points)
        pipeline = build_pipeline(self.cfg.pipeline, self.loaded, stream_id=sid, output_dir=self.stream_dir(sid),
                                  extra_sinks=[publisher], recording=self.recording, prefix=f"streams/{sid}/",
                                  describe={"source": f"serve:{sid}", "output_dir": str(self.stream_dir(sid)),
                                            "config": self.cfg.flat(), "checkpoint": self.loaded.info.describe()},
                                  # save_snapshot works on every stream; automatic ones (periodic, at close)
                                  # with --snapshot-every
                                  snapshot_dir=self.snapshot_root(sid), snapshot_at_close=bool(o.snapshot_every))
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

    def _accept(self, msg: FrameMessage, recv_ns: int, envelope: Optional[list], req_peer: bool) -> None:
        s = self.sessions.get(msg.stream_id) or self._new_session(msg)
        wants_ack = envelope is not None and (req_peer or msg.ack)
        if s is None:
            self.node_errors["too_many_streams"] += 1
            if wants_ack:
                self._send(self.ingest, envelope + [self._ack_body(msg, "rejected", "too many streams")])
            return
        s.received += 1
        s.last_activity = time.monotonic()
        if msg.lossless is not None:
            s.lossless = msg.lossless
        if msg.seq is None:
            msg.seq = s.next_seq
        if msg.session is not None and msg.session == s.publisher_session and s.last_seq is not None \
                and msg.seq <= s.last_seq:
            s.duplicates += 1  # a resend after a lost ack
            if wants_ack:
                self._send(self.ingest, envelope + [self._ack_body(msg, "duplicate")])
            return
        if msg.session != s.publisher_session and s.publisher_session is not None:
            _logger.info("stream %s: publisher restarted (session %s)", s.stream_id, msg.session)
        s.publisher_session = msg.session
        s.last_seq = msg.seq
        s.next_seq = max(s.next_seq, msg.seq + 1)
        if s.lossless:
            if len(s.queue) >= self.cfg.lossless_queue:
                s.busy += 1
                if wants_ack:
                    self._send(self.ingest, envelope + [self._ack_body(msg, "busy", "lossless queue full")])
                return
            s.queue.append(Pending(msg, recv_ns, envelope if wants_ack else None))
            return
        if s.queue:  # newest wins
            s.queue.pop()
            s.dropped += 1
        s.queue.append(Pending(msg, recv_ns, None))
        if wants_ack:
            self._send(self.ingest, envelope + [self._ack_body(msg, "received")])

    # ------------------------------------------------------------------------------------------
    # stepping

    def _step_ready(self) -> None:
        ready = [s for s in self.sessions.values() if s.queue]
        if not ready:
            return
        self._rr = (self._rr + 1) % len(ready)
        ready = (ready[self._rr:] + ready[: self._rr])[: self.cfg.max_batch]
        items = []
        for s in ready:
            p = s.queue.popleft()
            try:
                rgb = p.msg.image()
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
        from .control import handle_request

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
            self._send(self.control, envelope + handle_request(self, body))

    def stats(self) -> dict[str, Any]:
        return {"uptime_s": round(time.monotonic() - self.started, 3), "streams": len(self.sessions),
                "messages": self.counters["messages"], "published": self.counters["published"],
                "send_dropped": self.counters["send_dropped"], "internal_errors": self.counters["internal_errors"],
                "control_errors": self.counters["control_errors"], "model_calls": self.counters["model_calls"],
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
        for sid, s in list(self.sessions.items()):
            if not s.queue and now - s.last_activity > self.cfg.idle_timeout_s:
                _logger.info("stream %s idle for %.0f s: closing", sid, now - s.last_activity)
                self.close_stream(sid)

    def stream_dir(self, stream_id: str) -> Path:
        return self.output_dir / "streams" / stream_id

    def close_stream(self, stream_id: str, final_snapshot: bool = True) -> list[str]:
        """Close a stream's pipeline (its sinks write trajectory, map, summary; with ``--snapshot-every``
        a last snapshot) and forget it."""
        s = self.sessions.pop(stream_id)
        if not final_snapshot and s.pipeline.snapshots is not None:
            from dataclasses import replace

            s.pipeline.snapshots.policy = replace(s.pipeline.snapshots.policy, at_close=False)
        for p in s.queue:
            self._ack(p, "dropped", "stream closed")
        summary = s.pipeline.close(stop_reason="stream closed")
        directory = self.stream_dir(stream_id)
        status = {**s.status(), "closed": True}
        try:
            atomic_write_text(directory / "status.json", json.dumps(status, indent=1) + "\n")
        except OSError as e:
            _logger.error("stream %s: could not write status.json: %s", stream_id, e)
        self._send(self.results, encode_result(stream_id, "status", status))
        return [str(directory / n) for n in summary.get("outputs", [])] + [str(directory / "status.json")]

    def close(self) -> None:
        """Flush every open stream (atomically written files), then close the sockets."""
        for sid in list(self.sessions):
            try:
                self.close_stream(sid)
            except Exception:
                _logger.exception("could not flush stream %s", sid)
        if self.recording is not None:
            self.recording.close()
        for sock in (self.ingest, self.results, self.control, *self.subs):
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
