"""``streamrecon serve --ray``: the gateway keeps the node's sockets and protocol, Ray workers step the streams.

The gateway binds the same ingest / results / control sockets as the single node (same defaults,
loopback unless ``--allow-remote``, CURVE the same way) and routes each ``stream_id`` to one worker
actor (:class:`~streamrecon.cluster.worker.StreamWorker`): placement on the least loaded worker under
``--ray-streams-per-worker``, and a stream stays there (affinity) unless that worker dies or is drained.

Each worker runs the single node's own code (:class:`~streamrecon.cluster.hosted.HostedNode`): the
gateway sends it the frames' parts as they came (payloads through Ray's object store) in one
*exchange* at a time -- which steps its ready streams in one batched model call -- and sends the acks,
results and control replies the exchange returns on its own sockets. While a worker computes, the
gateway receives and queues its next exchange.

Payloads travel through Ray's object store, one object per exchange (every frame of it), read by the
worker as zero-copy views; nothing of ours is pickled on the way but the small headers.

A worker that dies (killed, out of memory, its machine lost): its streams restore on another worker
(or on the replacement the gateway starts) from their latest snapshot; a lossless stream's frames
since that snapshot are replayed from the gateway (nothing lost while they fit ``--ray-replay-frames``);
a live stream loses the frames since its snapshot and those in flight, counted per stream. Frames that
arrive meanwhile are held (lossless, up to ``--lossless-queue``) or newest-wins (live).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from .. import __version__
from ..server.config import ServeConfig
from ..server.control import COMMANDS
from ..server.sockets import open_node_sockets, send_nowait, split_envelope
from ..settings import SettingsError
from ..wire import PROTOCOL_VERSION, WireError, decode_frame, decode_request, decode_result, encode_reply, encode_result
from .config import DEFAULT_SNAPSHOT_EVERY, ClusterSettings
from .routes import Forward, Route, WorkerSlot, token_id, token_of

__all__ = ["Gateway", "GATEWAY_COMMANDS"]

_logger = logging.getLogger(__name__)
#: an idle worker still gets an (empty) exchange this often: its heartbeats, flushes and idle closes run
HOUSEKEEPING_S = 0.25
#: frames given to a worker in one exchange at most (the rest wait for the next one)
MAX_FRAMES_PER_EXCHANGE = 256
#: how long the gateway waits for a worker to start (importing torch, loading the model)
START_TIMEOUT_S = 600.0
GATEWAY_COMMANDS = ("ping", "stats", "shutdown", "drain_worker")
#: frames the gateway remembers waiting for their worker's answer at most (older ones are forgotten, counted)
MAX_TOKENS = 1 << 17
#: control requests waiting for one worker at most (more are answered with an error)
MAX_CONTROL_WAITING = 256
#: what a worker's acknowledgement says, for the gateway (imagezmq answers "OK" / "ERROR ...")
_FINAL = ("processed", "duplicate", "dropped", "busy", "rejected")


def _ack_body(msg, status: str, error: str = "", stream_id: Optional[str] = None, seq: Optional[int] = None) -> bytes:
    from ..server.node import Node

    return Node._ack_body(msg, status, error, stream_id, seq)


def _ack_status(body: bytes) -> Optional[str]:
    if body[:1] != b"{":
        return "processed" if body == b"OK" else "rejected"  # imagezmq
    try:
        status = json.loads(body).get("status")
    except (ValueError, AttributeError):
        return None
    return status if isinstance(status, str) else None


class Gateway:
    """Args:
        cfg: the node's settings (sockets, limits, and each stream's pipeline -- used by the workers).
        cluster: Ray settings (workers, what each reserves, placement cap, replay).
    """

    def __init__(self, cfg: ServeConfig, cluster: ClusterSettings) -> None:
        import ray
        import zmq

        cfg.validate()
        cluster.validate()
        o = cfg.pipeline.outputs
        if o.viewer != "none" or o.save_rrd:
            raise SettingsError("--viewer/--save-rrd are not available with --ray (each worker is its own process, "
                                "maybe on another machine); subscribe to the results socket instead")
        if not o.snapshot_every:  # failover restores from snapshots
            _logger.info("--ray: --snapshot-every %s (a stream continues from its latest snapshot if its worker dies)",
                         DEFAULT_SNAPSHOT_EVERY)
            cfg = replace(cfg, pipeline=replace(cfg.pipeline, outputs=replace(o, snapshot_every=DEFAULT_SNAPSHOT_EVERY)))
        self.cfg, self.cluster, self.ray, self.zmq = cfg, cluster, ray, zmq
        self._own_ray = False
        self._ray_init()
        self.worker_cfg = ServeConfig.of(**{**cfg.flat(), "curve_secret_key": None, "curve_clients": None, "subscribe": [],
                                            "max_streams": cluster.ray_streams_per_worker, "allow_remote": False,
                                            "ingest": "tcp://127.0.0.1:0", "results": "tcp://127.0.0.1:0",
                                            "control": "tcp://127.0.0.1:0"})
        gpus = ray.cluster_resources().get("GPU", 0)
        self.gpus_per_worker = cluster.ray_gpus_per_worker if cluster.ray_gpus_per_worker is not None else \
            (1.0 if gpus else 0.0)
        n = cluster.ray_workers or (max(1, int(gpus // self.gpus_per_worker)) if self.gpus_per_worker else 1)
        self.routes: dict[str, Route] = {}
        self.workers: dict[str, WorkerSlot] = {}
        self.node_errors: Counter = Counter()
        self.counters: Counter = Counter()
        self.recoveries: deque = deque(maxlen=50)  # seconds from a worker's death to its stream's restore
        self.started = time.monotonic()
        self._gateway_ns = 0  # time spent on frames in the gateway (receive, object store, forward)
        self._next_worker = 0
        self._stop = threading.Event()
        self._closing = False
        self._last_status = 0.0
        self._tokens: dict[bytes, Forward] = {}  # frames at a worker (or to be replayed), by their token's routing id
        self._next_token = 1
        self.ctx = zmq.Context()
        try:
            s = open_node_sockets(zmq, self.ctx, cfg)
            self.ingest, self.results, self.control, self.subs, self.poller, self.auth = \
                s.ingest, s.results, s.control, s.subs, s.poller, s.auth
            for _ in range(n):
                self._start_worker()
        except BaseException:
            self._shutdown_ray()
            self.ctx.destroy(linger=0)
            raise

    # ------------------------------------------------------------------------------------------
    # Ray and workers

    def _ray_init(self) -> None:
        ray, c = self.ray, self.cluster
        if ray.is_initialized():
            return
        if c.ray in (None, "", "local"):
            # a new instance on this machine, no dashboard (Ray's own ports: see the README's security notes)
            ray.init(address="local", num_cpus=c.ray_local_cpus, include_dashboard=False, configure_logging=False,
                     log_to_driver=True)
        else:
            ray.init(address=c.ray, configure_logging=False, log_to_driver=True)
        self._own_ray = True

    def _shutdown_ray(self) -> None:
        if self._own_ray and self.ray.is_initialized():
            self.ray.shutdown()

    def _start_worker(self, replaces: Optional[str] = None) -> WorkerSlot:
        from .worker import StreamWorker

        name = f"w{self._next_worker}"
        self._next_worker += 1
        c = self.cluster
        actor = self.ray.remote(StreamWorker).options(num_cpus=c.ray_cpus_per_worker, num_gpus=self.gpus_per_worker,
                                                      max_restarts=0, max_task_retries=0).remote(
            name, self.worker_cfg, c.ray_cpus_per_worker)
        w = WorkerSlot(name=name, actor=actor, ready_ref=actor.ready.remote(), replaces=replaces)
        self.workers[name] = w
        if replaces:
            self.counters["restarts"] += 1
        _logger.info("worker %s starting%s", name, f" (in place of {replaces})" if replaces else "")
        return w

    def _place(self) -> Optional[WorkerSlot]:
        """The ready worker with the fewest streams and room for one more (``None``: none has room)."""
        cap = self.cluster.ray_streams_per_worker
        free = [w for w in self.workers.values() if w.takes_streams and len(w.streams) < cap]
        return min(free, key=lambda w: (len(w.streams), len(w.frames), w.name)) if free else None

    def _check_starting(self) -> None:
        for w in list(self.workers.values()):
            if w.state != "starting":
                continue
            done, _ = self.ray.wait([w.ready_ref], timeout=0)
            if not done:
                if time.monotonic() - w.started > START_TIMEOUT_S:
                    self._died(w, f"did not start within {START_TIMEOUT_S:.0f} s")
                continue
            try:
                w.info = self.ray.get(w.ready_ref)
            except Exception as e:
                self._died(w, f"failed to start: {e}")
                continue
            w.state = "ready"
            w.last_exchange = time.monotonic()
            _logger.info("worker %s ready (pid %s on %s, %s)", w.name, w.info.get("pid"), w.info.get("node_ip"),
                         w.info.get("device"))

    # ------------------------------------------------------------------------------------------
    # loop

    @property
    def endpoints(self) -> dict[str, str]:
        return {n: getattr(self, n).getsockopt(self.zmq.LAST_ENDPOINT).decode() for n in ("ingest", "results", "control")}

    @property
    def output_dir(self):
        return self.cfg.pipeline.outputs.output_dir

    def stop(self) -> None:
        """Ask the loop to finish (thread-safe)."""
        self._stop.set()

    def serve_forever(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_once()
        finally:
            self.close()

    def run_once(self, timeout_ms: int = 20) -> None:
        """Receive, route, collect finished exchanges, start new ones, housekeeping."""
        inflight = any(w.inflight is not None for w in self.workers.values())
        events = dict(self.poller.poll(0 if inflight else timeout_ms))
        for sock in events:
            try:
                if sock is self.control:
                    self._drain_control()
                else:
                    self._drain_ingest(sock, router=sock is self.ingest)
            except Exception:
                self.counters["internal_errors"] += 1
                _logger.exception("gateway: error while receiving")
        steps = ((self._collect, (0.002 if inflight and not events else 0.0,)), (self._check_starting, ()),
                 (self._assign_waiting, ()), (self._dispatch, ()), (self._housekeeping, ()))
        for step, args in steps:
            try:
                step(*args)
            except Exception:
                self.counters["internal_errors"] += 1
                _logger.exception("gateway: error in %s", step.__name__)

    # ------------------------------------------------------------------------------------------
    # ingest

    def _send(self, sock, parts: list) -> None:
        send_nowait(self.zmq, sock, parts, self.counters)

    def _reply(self, fwd_or_env, msg, status: str, error: str = "") -> None:
        env = fwd_or_env.envelope if isinstance(fwd_or_env, Forward) else fwd_or_env
        if env:
            self._send(self.ingest, list(env) + [_ack_body(msg, status, error)])

    def _drain_ingest(self, sock, router: bool) -> None:
        zmq = self.zmq
        for _ in range(512):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            t0 = time.perf_counter_ns()
            self.counters["messages"] += 1
            envelope, req_peer = [], False
            if router:
                envelope, req_peer, parts = split_envelope(parts)
            try:
                msg = decode_frame(parts, self.cfg.max_message_bytes)
            except WireError as e:
                self._count_error(e.stream_id, e.kind)
                if envelope:
                    self._send(self.ingest, envelope + [_ack_body(None, "rejected", str(e), e.stream_id, e.seq)])
                continue
            self._on_frame(msg, envelope, req_peer, parts)
            self._gateway_ns += time.perf_counter_ns() - t0

    def _count_error(self, stream_id: Optional[str], kind: str) -> None:
        r = self.routes.get(stream_id) if stream_id else None
        if r is not None:
            r.status.setdefault("gateway_errors", {})
            r.status["gateway_errors"][kind] = r.status["gateway_errors"].get(kind, 0) + 1
        self.node_errors[kind] += 1

    def _lossless(self, r: Route, msg, req_peer: bool) -> bool:
        if r.lossless is not None and msg.lossless is None:
            return r.lossless
        default = True if req_peer else self.cfg.lossless
        return default if msg.lossless is None else msg.lossless

    def _on_frame(self, msg, envelope: list, req_peer: bool, parts: list) -> None:
        wants_ack = bool(envelope) and (req_peer or msg.ack)
        env = envelope if wants_ack else []
        sid = msg.stream_id
        r = self.routes.get(sid)
        if self._closing:
            self.node_errors["refused_shutting_down"] += 1
            self._reply(env, msg, "busy", "the node is shutting down; send again later")
            return
        if r is None:
            if len(self.routes) >= self.cfg.max_streams:
                self.node_errors["too_many_streams"] += 1
                self._reply(env, msg, "rejected", "too many streams")
                return
            w = self._place()
            if w is None and not any(x.state == "starting" for x in self.workers.values()):
                self.node_errors["no_worker_room"] += 1
                self._reply(env, msg, "rejected", f"no worker has room for a new stream "
                            f"({sum(x.takes_streams for x in self.workers.values())} workers x "
                            f"{self.cluster.ray_streams_per_worker} streams)")
                return
            r = self.routes[sid] = Route(sid, worker=w.name if w else None)
            if w is not None:
                w.streams.add(sid)
        fwd = Forward(msg=msg, envelope=env, header=bytes(parts[0].buffer), wants_ack=wants_ack, req_peer=req_peer,
                      payload=np.frombuffer(parts[1].buffer, dtype=np.uint8),  # a view: no copy until the put
                      token=self._next_token)
        self._next_token += 1
        r.forwarded += 1
        self.counters["frames"] += 1
        if r.worker is None or r.moving or r.resend or r.held:  # in order: behind what waits for the worker
            self._hold(r, fwd)
        else:
            self._send_to(r, fwd)

    def _hold(self, r: Route, fwd: Forward) -> None:
        """A frame for a stream without a worker just now (failover, move): held until it has one."""
        if self._lossless(r, fwd.msg, fwd.req_peer):
            if len(r.held) >= self.cfg.lossless_queue:
                r.busy += 1
                self._reply(fwd, fwd.msg, "busy", "the stream is moving to another worker; send again")
                return
        else:
            while r.held:
                old = r.held.pop()
                r.held_dropped += 1
                self._reply(old, old.msg, "dropped", "replaced by a newer frame while the stream moved (live stream)")
        r.held.append(fwd)

    def _send_to(self, r: Route, fwd: Forward) -> None:
        """Queue a frame for the stream's worker's next exchange. While the worker is busy a live stream's
        newest frame wins here too, and a lossless stream has at most ``--lossless-queue`` waiting."""
        w = self.workers[r.worker]
        sid = fwd.msg.stream_id
        lossless = self._lossless(r, fwd.msg, fwd.req_peer)
        waiting = [f for f in w.frames if f.msg.stream_id == sid] if w.frames else []
        if not lossless and waiting:
            w.frames = [f for f in w.frames if f.msg.stream_id != sid or self._lossless(r, f.msg, f.req_peer)]
            for old in waiting:
                if not self._lossless(r, old.msg, old.req_peer):
                    r.held_dropped += 1
                    self._forget(old)
                    self._reply(old, old.msg, "dropped", "replaced by a newer frame (live stream)")
        elif lossless and len(waiting) >= self.cfg.lossless_queue:
            r.busy += 1
            self._reply(fwd, fwd.msg, "busy", "lossless queue full")
            return
        w.frames.append(fwd)
        self._tokens[token_id(fwd.token)] = fwd
        while len(self._tokens) > MAX_TOKENS:  # answers that never came (e.g. a duplicate's first copy)
            self._tokens.pop(next(iter(self._tokens)))
            self.counters["tokens_forgotten"] += 1
        if r.lossless is not False:
            r.replay.append(fwd)
            while len(r.replay) > self.cluster.ray_replay_frames:
                r.replay.popleft()

    def _forget(self, fwd: Forward) -> None:
        self._tokens.pop(token_id(fwd.token), None)

    def _feed(self, w: WorkerSlot) -> None:
        """A stream continuing on ``w`` gets its replay, then what was held, a lossless queue at a time
        (the worker would refuse more, and the senders of replayed frames cannot send them again)."""
        for sid in sorted(w.streams):
            r = self.routes.get(sid)
            if r is None or r.worker != w.name or r.moving or not (r.resend or r.held):
                continue
            if any(op[1] == sid for op in w.ops):  # restored first
                continue
            budget = self.cfg.lossless_queue - r.queue - sum(f.msg.stream_id == sid for f in w.frames)
            while budget > 0 and r.resend:
                self._send_to(r, r.resend.popleft())
                budget -= 1
            while r.held and not r.resend and (budget > 0 or r.lossless is False):
                self._send_to(r, r.held.popleft())
                budget -= 1

    # ------------------------------------------------------------------------------------------
    # exchanges

    def _dispatch(self) -> None:
        now = time.monotonic()
        for w in self.workers.values():
            if w.inflight is not None or w.state not in ("ready", "draining"):
                continue
            self._feed(w)
            if not (w.frames or w.control or w.ops or w.work or now - w.last_exchange >= HOUSEKEEPING_S):
                continue
            t0 = time.perf_counter_ns()
            frames, w.frames = w.frames[:MAX_FRAMES_PER_EXCHANGE], w.frames[MAX_FRAMES_PER_EXCHANGE:]
            # one object per exchange: Ray's per-object cost (~2 ms here) is paid once, not once per frame
            payloads = self.ray.put([f.payload for f in frames]) if frames else None
            w.inflight = w.actor.exchange.remote([f.for_worker() for f in frames], payloads, w.control, w.ops)
            w.inflight_frames, w.inflight_control, w.inflight_ops = frames, w.control, w.ops
            w.control, w.ops = [], []
            w.frames_sent += len(frames)
            w.sent_at = now
            self._gateway_ns += time.perf_counter_ns() - t0

    def _collect(self, wait_s: float = 0.0) -> None:
        pending = {w.inflight: w for w in self.workers.values() if w.inflight is not None}
        if not pending:
            return
        refs = list(pending)
        done, _ = self.ray.wait(refs, num_returns=1, timeout=wait_s)
        if done:
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            w = pending[ref]
            try:
                out = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                self._died(w, str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            except Exception as e:  # the exchange raised: what the worker holds is unknown -- treated as its death
                self.counters["internal_errors"] += 1
                self._died(w, f"exchange failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            t0 = time.perf_counter_ns()
            self._apply(w, out)
            self._gateway_ns += time.perf_counter_ns() - t0

    @staticmethod
    def _control_env(parts: list) -> list:
        return parts[:2] if len(parts) >= 2 and parts[1] == b"" else parts[:1]

    def _apply(self, w: WorkerSlot, out) -> None:
        now = time.monotonic()
        w.inflight = None
        w.exchanges += 1
        w.exchange_s += now - w.sent_at
        w.last_exchange, w.work, w.stats = now, out.work, out.stats
        for op in out.ops:
            self._op_done(w, op)
        requeue: dict[str, list] = {}
        for parts in out.ingest:
            self._on_ack(parts, requeue)
        for sid, frames in requeue.items():  # refused replays go again first, in order
            r = self.routes[sid]
            r.requeued += len(frames)
            r.resend.extendleft(reversed(frames))
        for parts in out.results:
            topic = parts[0]
            if topic == b"_node/status":
                continue
            if topic.endswith(b"/status"):
                parts = self._decorate_status(w, parts)
            else:
                self.counters["published"] += 1
            self._send(self.results, parts)
        for parts in out.control:
            self._send(self.control, parts)
        for sid, b in out.streams.items():
            r = self.routes.get(sid)
            if r is None:  # opened by a control request (load_snapshot)
                r = self.routes[sid] = Route(sid, worker=w.name)
            if r.worker != w.name:
                continue
            w.streams.add(sid)
            r.lossless, r.processed, r.queue, r.fps, r.restored_from = b.lossless, b.processed, b.queue, b.fps, b.restored_from
            last = token_of(b.snapshot_last) if b.snapshot_last is not None else None
            # a lossless stream's snapshot counts once the gateway knows its last frame (its replay starts
            # there); a live stream has no replay: how many frames it holds is enough
            if b.snapshot_frames is not None and (last is not None or not b.lossless):
                r.snapshot_frames, r.snapshot_token, r.snapshot_name = b.snapshot_frames, last, b.snapshot_name
                while last is not None and r.replay and r.replay[0].token <= last:  # covered (frames go in token order)
                    r.replay.popleft()
            if not b.lossless:
                r.replay.clear()
        # a stream the worker does not hold (closed, or its first frame refused) with nothing on its way: gone
        waiting = {f.msg.stream_id for f in w.frames} | {op[1] for op in w.ops}
        for sid in sorted(w.streams):
            r = self.routes.get(sid)
            if r is None:
                w.streams.discard(sid)
            elif r.worker == w.name and sid not in out.streams and sid not in waiting and not (
                    r.moving or r.held or r.resend or r.needs_adopt):
                del self.routes[sid]
                w.streams.discard(sid)
        if w.state == "draining" and not w.streams and not w.frames and not w.ops and not w.control:
            w.state = "retired"
            _logger.info("worker %s drained: retired", w.name)
            self.ray.kill(w.actor)

    def _on_ack(self, parts: list, requeue: dict) -> None:
        """A worker's acknowledgement of the frame its token names: passed to the frame's sender when the
        sender asked for it and has not heard it yet; the frame is then done (``processed``/``duplicate``:
        a replay does not answer it again) or gone (``dropped``/``busy``/``rejected``: not replayed). A
        replayed frame the worker refuses as busy goes into ``requeue`` (its sender cannot send it again)."""
        fwd = self._tokens.get(parts[0])
        if fwd is None:
            self.counters["acks_unmatched"] += 1
            return
        body = parts[-1]
        status = _ack_status(body)
        already = fwd.acked
        if status in _FINAL:
            self._forget(fwd)
        r = self.routes.get(fwd.msg.stream_id)
        if status == "busy" and already and r is not None:
            requeue.setdefault(r.stream_id, []).append(fwd)
            if fwd in r.replay:  # back to the replay when it is fed again
                r.replay.remove(fwd)
            self._tokens[parts[0]] = fwd
            return
        if not already:
            fwd.status = status
        if status in ("dropped", "busy", "rejected") and r is not None and fwd in r.replay:
            r.replay.remove(fwd)
        if fwd.wants_ack and not already and fwd.envelope:
            self._send(self.ingest, list(fwd.envelope) + [body])

    def _decorate_status(self, w: WorkerSlot, parts: list) -> list:
        try:
            _, header, arrays = decode_result(parts)
        except WireError:
            return parts
        sid = header.get("stream_id")
        r = self.routes.get(sid)
        for k in ("v", "stream_id", "kind"):
            header.pop(k, None)
        header["worker"] = w.name
        if r is not None:
            header["cluster"] = r.brief()
            r.status = {**header, "gateway_errors": r.status.get("gateway_errors", {})}
        return encode_result(sid, "status", header, arrays)

    # ------------------------------------------------------------------------------------------
    # failover and moves

    def _died(self, w: WorkerSlot, reason: str) -> None:
        """A worker is gone: its control requests are answered, its streams wait for another worker
        with their replay, and (``--ray-replace``) a new worker starts in its place."""
        was_ready = w.state in ("ready", "draining")
        w.state, w.error, w.inflight = "dead", reason, None
        self.counters["worker_deaths"] += 1
        _logger.error("worker %s died (%s); %d streams continue elsewhere from their snapshots", w.name, reason,
                      len(w.streams))
        for env in w.inflight_control + w.control:
            self.counters["control_errors"] += 1
            self._send(self.control, self._control_env(env) + encode_reply(
                False, error=f"worker {w.name} died; send the request again"))
        in_flight = w.inflight_frames + w.frames
        w.frames, w.control, w.ops, w.inflight_frames, w.inflight_control = [], [], [], [], []
        now = time.monotonic()
        for sid in sorted(w.streams):
            r = self.routes.get(sid)
            if r is None:
                continue
            r.failovers += 1
            r.worker, r.moving, r.needs_adopt, r.failed_at = None, False, True, now
            mine = [f for f in in_flight if f.msg.stream_id == sid]
            since = max(0, r.processed - (r.snapshot_frames or 0))
            if r.lossless is not False:
                # every frame sent since the snapshot, in order (those fed before, then those still to feed)
                keep = list(r.replay) + list(r.resend)
                kept = set(map(id, keep))
                r.lost += max(0, since - sum(f.status == "processed" for f in keep))
                for f in mine:  # in flight but beyond the replay buffer: its sender sends it again
                    if id(f) not in kept:
                        self._forget(f)
                        r.dropped_in_flight += 1
                        self._reply(f, f.msg, "busy", f"worker {w.name} died; send again")
                r.resend, r.replay = deque(keep), deque()
            else:
                r.lost += since
                for f in mine:
                    self._forget(f)
                    r.dropped_in_flight += 1
                    if not f.acked:
                        self._reply(f, f.msg, "dropped", f"worker {w.name} died")
                r.replay.clear()
            r.expect_frames = r.snapshot_frames or 0
            r.processed, r.queue = r.snapshot_frames or 0, 0
        w.streams.clear()
        try:
            self.ray.kill(w.actor)
        except Exception:
            pass
        if self.cluster.ray_replace and not self._closing and (was_ready or w.replaces is None):
            self._start_worker(replaces=w.name)
        self._assign_waiting()

    def _assign_waiting(self) -> None:
        """Streams without a worker (after a failover or a move) go to the least loaded one: restored
        from their snapshot first, then their replay, then what was held."""
        for r in sorted((r for r in self.routes.values() if r.worker is None), key=lambda r: r.failed_at or 0):
            w = self._place()
            if w is None:
                return
            r.worker = w.name
            w.streams.add(r.stream_id)
            if r.needs_adopt:
                lossless = r.lossless if r.lossless is not None else self.cfg.lossless
                w.ops.append(("adopt", r.stream_id, lossless, r.snapshot_name))
                r.needs_adopt = False
            r.replayed += len(r.resend)  # fed to it by _feed, after the restore

    def _op_done(self, w: WorkerSlot, op: dict) -> None:
        r = self.routes.get(op.get("stream_id"))
        if op["op"] == "adopt":
            if r is None:
                return
            if r.failed_at is not None:
                r.recovery_s = round(time.monotonic() - r.failed_at, 3)
                self.recoveries.append(r.recovery_s)
                r.failed_at = None
            if r.expect_frames is not None and op.get("frames") != r.expect_frames:
                self.counters["restore_mismatch"] += 1
                _logger.warning("stream %s: restored at frame %s, the gateway expected %s (a damaged snapshot passed "
                                "over?)", r.stream_id, op.get("frames"), r.expect_frames)
            r.restored_from, r.restored_frames = op.get("restored_from"), op.get("frames")
            _logger.info("stream %s continues on %s from %s (%s frames); %d replayed", r.stream_id, w.name,
                         r.restored_from or "nothing", op.get("frames"), r.replayed)
            if not op.get("ok"):
                self.counters["adopt_failed"] += 1
                _logger.error("stream %s: restore on %s failed (%s); it continues there as a new stream",
                              r.stream_id, w.name, op.get("error"))
        elif op["op"] == "release":
            if r is None or r.worker != w.name:  # not this worker's any more (e.g. it failed over meanwhile)
                return
            r.moving = False
            if not op.get("ok") and op.get("open"):  # it could not be handed over: it stays where it is
                self.counters["release_failed"] += 1
                _logger.error("stream %s: cannot leave %s (%s); it stays there", r.stream_id, w.name, op.get("error"))
                r.resend.extend(r.held)
                r.held.clear()
                return
            w.streams.discard(r.stream_id)
            if not op.get("ok") and not op.get("failed"):  # it was gone already (closed): nothing to move
                if not r.held:
                    del self.routes[r.stream_id]
                else:
                    r.worker = None
                return
            r.worker, r.needs_adopt, r.moves, r.queue = None, True, r.moves + 1, 0
            if op.get("ok"):
                r.snapshot_frames, r.snapshot_token, r.expect_frames = op.get("frames"), None, op.get("frames")
                r.snapshot_name = op.get("snapshot")
                r.replay.clear()
            else:  # it failed half-way and closed: from its latest snapshot, with its replay, as after a death
                self.counters["release_failed"] += 1
                r.resend.extend(r.replay)
                r.replay.clear()
                r.expect_frames = r.snapshot_frames or 0
            r.failed_at = None

    def drain_worker(self, name: str) -> int:
        """Move every stream off worker ``name`` (snapshot, close, restore elsewhere), then retire it."""
        w = self.workers.get(name)
        if w is None or not w.alive:
            raise KeyError(name)
        if w.state == "draining":
            raise ValueError(f"worker {name} is being drained already")
        if not any(x.takes_streams or x.state == "starting" for x in self.workers.values() if x is not w):
            raise ValueError("no other worker to take its streams")
        w.state = "draining"
        moving = 0
        for sid in sorted(w.streams):
            r = self.routes.get(sid)
            if r is None or r.moving or r.worker != w.name:
                continue
            r.moving = True
            moving += 1
            mine = [f for f in w.frames if f.msg.stream_id == sid]  # not sent yet: they follow the stream
            w.frames = [f for f in w.frames if f.msg.stream_id != sid]
            for f in mine:  # held, not in the replay (a death meanwhile would send them twice)
                self._forget(f)
                if f in r.replay:
                    r.replay.remove(f)
            r.held.extendleft(reversed(list(r.resend) + mine))
            r.resend.clear()
            w.ops.append(("release", sid))
        return moving

    # ------------------------------------------------------------------------------------------
    # control

    def _drain_control(self) -> None:
        zmq = self.zmq
        for _ in range(64):
            try:
                parts = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope = parts[:2] if len(parts) >= 2 and parts[1] == b"" else parts[:1]
            self._on_control(envelope, parts[len(envelope):])

    def _on_control(self, envelope: list, body: list) -> None:
        def answer(ok: bool, **fields) -> None:
            if not ok:
                self.counters["control_errors"] += 1
            self._send(self.control, envelope + encode_reply(ok, **fields))

        try:
            req = decode_request(body)
        except WireError as e:
            return answer(False, error=str(e))
        cmd = req["cmd"]
        if cmd == "ping":
            return answer(True, cmd=cmd, version=__version__, protocol=PROTOCOL_VERSION, cluster=True)
        if cmd == "stats":
            return answer(True, cmd=cmd, node=self.stats(), streams=self.stream_statuses())
        if cmd == "shutdown":
            self.stop()
            return answer(True, cmd=cmd)
        if cmd == "drain_worker":
            name = req.get("worker")
            try:
                moved = self.drain_worker(name) if isinstance(name, str) else None
            except KeyError:
                moved = None
            except ValueError as e:
                return answer(False, cmd=cmd, error=str(e))
            if moved is None:
                return answer(False, cmd=cmd, error=f"no running worker {name!r} (workers: "
                              f"{', '.join(w.name for w in self.workers.values() if w.alive)})")
            return answer(True, cmd=cmd, worker=name, streams_moving=moved)
        if cmd not in COMMANDS:
            return answer(False, cmd=cmd, error=f"unknown command {cmd[:40]!r}; known: "
                          f"{', '.join(dict.fromkeys([*GATEWAY_COMMANDS, *COMMANDS]))}")
        sid = req.get("stream_id")
        r = self.routes.get(sid) if isinstance(sid, str) else None
        if r is not None:
            if r.worker is None or r.moving:
                return answer(False, cmd=cmd, error=f"stream {sid!r} is moving to another worker; try again")
            return self._to_worker(self.workers[r.worker], envelope, body, answer)
        if cmd == "load_snapshot" and isinstance(sid, str):
            w = self._place()
            if w is None:
                return answer(False, cmd=cmd, error="no worker has room for another stream")
            return self._to_worker(w, envelope, body, answer)  # the worker checks it; the route comes with the stream
        ready = [w for w in self.workers.values() if w.state in ("ready", "draining")]
        if cmd == "list_snapshots" and ready:  # the snapshots are in the shared output directory
            return self._to_worker(ready[0], envelope, body, answer)
        answer(False, cmd=cmd, error=f"no open stream {sid!r} (open: {sorted(self.routes)[:20]})"
               if sid is not None else "this command needs a 'stream_id'")

    @staticmethod
    def _to_worker(w: WorkerSlot, envelope: list, body: list, answer) -> None:
        if len(w.control) >= MAX_CONTROL_WAITING:
            return answer(False, error=f"worker {w.name} has {len(w.control)} requests waiting; try again")
        w.control.append(envelope + body)

    # ------------------------------------------------------------------------------------------
    # status, housekeeping, shutdown

    def stats(self) -> dict[str, Any]:
        frames = self.counters["frames"]
        return {"uptime_s": round(time.monotonic() - self.started, 3), "streams": len(self.routes),
                "messages": self.counters["messages"], "frames": frames, "published": self.counters["published"],
                "send_dropped": self.counters["send_dropped"], "internal_errors": self.counters["internal_errors"],
                "control_errors": self.counters["control_errors"], "errors_by_kind": dict(self.node_errors),
                "errors": sum(self.node_errors.values()), "endpoints": self.endpoints,
                "gateway_ms_per_frame": round(self._gateway_ns / frames / 1e6, 4) if frames else None,
                "cluster": {"ray": self.cluster.ray or "local", "workers_alive": sum(w.alive for w in self.workers.values()),
                            "restarts": self.counters["restarts"], "worker_deaths": self.counters["worker_deaths"],
                            "recoveries_s": list(self.recoveries), "restore_mismatch": self.counters["restore_mismatch"],
                            "streams_per_worker": self.cluster.ray_streams_per_worker,
                            "gpus_per_worker": self.gpus_per_worker, "cpus_per_worker": self.cluster.ray_cpus_per_worker},
                "workers": [w.status(self.routes) for w in self.workers.values()]}

    def stream_statuses(self) -> dict[str, dict]:
        # the worker's latest heartbeat, with the counters of its latest exchange (fresher: after a move the
        # heartbeat can still be the previous worker's until the new one publishes, so what the move changed
        # -- worker, restored_from -- comes from the route)
        return {sid: {**r.status, "stream_id": sid, "processed": r.processed, "queue_depth": r.queue, "fps": r.fps,
                      "worker": r.worker, "restored_from": r.restored_from, "cluster": r.brief()}
                for sid, r in self.routes.items()}

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_status >= self.cfg.status_interval_s:
            self._last_status = now
            self._send(self.results, [b"_node/status", *encode_result("_node", "status", self.stats())[1:]])

    def _answer_waiting(self) -> None:
        for _ in range(64):
            if not self.ingest.poll(0):
                return
            self._drain_ingest(self.ingest, router=True)

    def close(self) -> None:
        """Shut down: new frames are refused (``busy``), frames already accepted go to their workers,
        every worker closes like the single node (lossless frames processed, every stream flushed)."""
        self._closing = True
        deadline = time.monotonic() + self.cfg.drain_timeout_s + 60
        try:
            for r in self.routes.values():  # what could not reach a worker hears busy: the sender resends
                for f in [*r.resend, *r.held]:
                    if f.acked:  # a replayed frame its sender will not send again
                        r.lost += 1
                    else:
                        self._reply(f, f.msg, "busy", "the node is shutting down; send again later")
                r.resend.clear()
                r.held.clear()
            while time.monotonic() < deadline and any(
                    w.inflight is not None or ((w.frames or w.ops or w.control) and w.state in ("ready", "draining"))
                    for w in self.workers.values()):
                self._collect(0.05)
                self._dispatch()
                self._answer_waiting()
            closing = {w.actor.close.remote(): w for w in self.workers.values() if w.state in ("ready", "draining")}
            left = max(1.0, deadline - time.monotonic())
            done, _ = self.ray.wait(list(closing), num_returns=len(closing), timeout=left) if closing else ([], [])
            for ref in done:
                try:
                    self._apply(closing[ref], self.ray.get(ref))
                except Exception as e:
                    self.counters["close_errors"] += 1
                    _logger.error("worker %s: close failed: %s", closing[ref].name, e)
            for ref, w in closing.items():
                if ref not in done:
                    self.counters["close_errors"] += 1
                    _logger.error("worker %s did not close in time", w.name)
            self._answer_waiting()
        finally:
            for w in self.workers.values():
                if w.state != "dead":
                    try:
                        self.ray.kill(w.actor)
                    except Exception:
                        pass
                    if w.state != "retired":
                        w.state = "closed"
            self.ingest.close(linger=500)
            for sock in (self.results, self.control, *self.subs):
                sock.close(linger=0)
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()
            self._shutdown_ray()
