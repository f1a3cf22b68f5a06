"""The node's three bound sockets (and optional imagezmq SUBs), opened from :class:`ServeConfig`.

Shared by the single node (:class:`~streamrecon.server.node.Node`) and the Ray gateway
(:class:`~streamrecon.cluster.gateway.Gateway`): one wire protocol, one set of limits, one CURVE setup.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from ..settings import SettingsError
from .config import ServeConfig, is_loopback_endpoint

__all__ = ["NodeSockets", "open_node_sockets", "split_envelope", "send_nowait", "RESULTS_HWM", "CONTROL_MAX_BYTES"]

_logger = logging.getLogger(__name__)
#: messages a slow subscriber may have waiting on the results socket before it loses them
RESULTS_HWM = 256
#: largest control request part (ZeroMQ drops larger ones before the node reads them)
CONTROL_MAX_BYTES = 1 << 20


@dataclass
class NodeSockets:
    """ingest ROUTER, results PUB, control ROUTER, imagezmq SUBs, a poller over the readable ones,
    and the CURVE authenticator thread (``None`` without CURVE)."""

    ingest: Any
    results: Any
    control: Any
    subs: list = field(default_factory=list)
    poller: Any = None
    auth: Optional[Any] = None

    def endpoints(self, zmq) -> dict[str, str]:
        """Actual bound endpoints (resolves ``:0`` / ``*`` ports)."""
        return {n: getattr(self, n).getsockopt(zmq.LAST_ENDPOINT).decode() for n in ("ingest", "results", "control")}


def open_node_sockets(zmq, ctx, cfg: ServeConfig) -> NodeSockets:
    """Bind the sockets of ``cfg`` (limits set before bind; CURVE when configured). Raises
    :class:`~streamrecon.settings.SettingsError` naming the socket that cannot bind."""
    auth, keys = None, None
    if cfg.curve_secret_key:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        keys = zmq.auth.load_certificate(cfg.curve_secret_key)
        if keys[1] is None:
            raise SettingsError(f"{cfg.curve_secret_key} holds no secret key")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(cfg.curve_clients))
    elif any(not is_loopback_endpoint(getattr(cfg, n)) for n in ("ingest", "results", "control")):
        _logger.warning("the node listens beyond loopback WITHOUT authentication; use --curve-secret-key")

    opened: list = []

    def socket(kind: int, options: dict, secure: bool = True):
        # limits apply only to connections made after they are set: set them before bind/connect
        sock = ctx.socket(kind)
        opened.append(sock)
        sock.linger = 0
        for opt, value in options.items():
            sock.setsockopt(opt, value)
        if secure and keys is not None:
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = keys[1], keys[0], True
        return sock

    def bind(kind: int, endpoint: str, name: str, options: dict):
        sock = socket(kind, options)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise SettingsError(f"cannot bind the {name} socket to {endpoint}: {e}") from None
        return sock

    try:
        ingest = bind(zmq.ROUTER, cfg.ingest, "ingest", {zmq.MAXMSGSIZE: cfg.max_message_bytes, zmq.RCVHWM: 64,
                                                         zmq.SNDHWM: 1000})
        results = bind(zmq.PUB, cfg.results, "results", {zmq.SNDHWM: RESULTS_HWM, zmq.MAXMSGSIZE: 1 << 16})
        control = bind(zmq.ROUTER, cfg.control, "control", {zmq.MAXMSGSIZE: CONTROL_MAX_BYTES, zmq.RCVHWM: 64})
        subs = []
        for ep in cfg.subscribe:
            # a SUB connects to an imagezmq sender's PUB: plain ZeroMQ, as imagezmq speaks it
            sub = socket(zmq.SUB, {zmq.MAXMSGSIZE: cfg.max_message_bytes, zmq.RCVHWM: 8, zmq.SUBSCRIBE: b""}, secure=False)
            sub.connect(ep)
            subs.append(sub)
    except BaseException:
        for sock in opened:
            sock.close(linger=0)
        if auth is not None:
            auth.stop()
        raise
    poller = zmq.Poller()
    for sock in (ingest, control, *subs):
        poller.register(sock, zmq.POLLIN)
    return NodeSockets(ingest, results, control, subs, poller, auth)


def split_envelope(parts: list) -> tuple[list, bool, list]:
    """A ROUTER message -> ``(envelope, req_peer, body)``: the peer's routing id as bytes (and the
    empty delimiter of a REQ peer, ``[id, b"", ...]``), whether it is a REQ peer, the rest."""
    if len(parts) >= 2 and len(parts[1].buffer) == 0:
        return [parts[0].bytes, b""], True, parts[2:]
    return [parts[0].bytes], False, parts[1:]


def send_nowait(zmq, sock, parts: list, counters) -> None:
    """Send without blocking: a full queue counts ``send_dropped``, a failed send ``send_errors``."""
    try:
        sock.send_multipart(parts, flags=zmq.NOBLOCK)
    except zmq.Again:
        counters["send_dropped"] += 1
    except zmq.ZMQError as e:  # e.g. the peer is gone
        counters["send_errors"] += 1
        _logger.debug("send failed: %s", e)
