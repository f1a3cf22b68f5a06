#!/usr/bin/env python3
"""camera_pub: send a webcam, a video or an image folder to a ``streamrecon serve`` node.

Torch-free (numpy, pyzmq, OpenCV, Pillow and ``streamrecon.wire``/``streamrecon.sources`` only).

* live (default): newest frame wins end to end; a frame the socket cannot take now is dropped here.
* ``--lossless``: every frame is delivered; at most ``--window`` frames wait unacknowledged and the
  sender blocks for acks (backpressure). A frame is done only when the node says ``processed`` (or
  ``rejected``, or ``duplicate``: processed before); ``busy`` (queue full, node shutting down) and
  ``dropped`` (a stream closed before it got to the frame) make it send those frames again, in
  order: one for each frame the node finishes (it made room), the rest after a back-off. Without
  any ack for ``--ack-timeout`` seconds the socket is rebuilt and the unacknowledged frames are sent
  again (the node drops duplicates by session + seq),
  so a node that restarts is picked up again; after ``--give-up-after`` seconds without a frame done
  it gives up (exit 1).

Example (``streamrecon-camera-pub`` is installed by ``pip install streamrecon``; the same as
``python -m streamrecon_bridges.camera_pub``)::

    streamrecon-camera-pub 0 --stream-id kitchen --fps 15
    streamrecon-camera-pub clip.mp4 --stream-id clip --lossless --encoding jpeg
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
import time
from collections import OrderedDict
from typing import Optional

import zmq

from streamrecon import wire
from streamrecon.netsec import curve_client

__all__ = ["Publisher", "main"]

_logger = logging.getLogger("camera_pub")
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.05, 1.0  # resend delay after busy/dropped (doubling while they go on)


class Publisher:
    """Frames of one stream to a node's ingest socket.

    Args:
        endpoint: the node's ingest endpoint.
        stream_id: stream name (letters, digits, ``._:@-``).
        encoding: ``rgb8``, ``bgr8``, ``mono8``, ``jpeg`` or ``png``.
        lossless: wait for acks (see module docstring).
        window: unacknowledged frames allowed in lossless mode.
        ack_timeout: seconds without ack before reconnecting and resending.
        curve: ``(server_public_key_file, client_secret_key_file)`` to use CURVE.
    """

    def __init__(self, endpoint: str, stream_id: str, encoding: str = "rgb8", lossless: bool = False, window: int = 4,
                 ack_timeout: float = 5.0, curve: Optional[tuple[str, str]] = None, quality: int = 90,
                 context: Optional[zmq.Context] = None) -> None:
        if not wire.valid_stream_id(stream_id):
            raise ValueError(f"invalid stream id {stream_id!r}")
        self.endpoint, self.stream_id, self.encoding = endpoint, stream_id, encoding
        self.lossless, self.window, self.ack_timeout = lossless, max(1, window), ack_timeout
        self.curve, self.quality = curve, quality
        self.ctx = context or zmq.Context.instance()
        self.session = secrets.token_hex(8)  # lets the node tell resends from a restarted publisher
        self.seq = 0
        self.sent = self.dropped = self.acked = self.reconnects = self.rejected = 0
        self._inflight: "OrderedDict[int, list]" = OrderedDict()
        self._resend_at: Optional[float] = None  # busy / dropped: send the unacknowledged frames again then
        self._resend_from: Optional[int] = None  # ... from this seq on (earlier ones are waiting in the node)
        self._backoff = _BACKOFF_MIN_S
        self._last_refusal = 0.0
        self.resends = 0
        self._last_progress = time.monotonic()
        self._last_ack = time.monotonic()  # an acknowledgement (or the start): what give_up_s counts from
        self.give_up_s: Optional[float] = None
        self.sock: Optional[zmq.Socket] = None
        self._connect()

    def _connect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndhwm = 2 if not self.lossless else self.window + 2
        if self.curve:
            curve_client(self.sock, *self.curve)
        self.sock.connect(self.endpoint)

    def _reconnect_and_resend(self) -> None:
        self.reconnects += 1
        _logger.warning("no ack for %.1f s: reconnecting to %s and resending %d frames", self.ack_timeout, self.endpoint,
                        len(self._inflight))
        self._connect()
        self._resend_at = self._resend_from = None  # everything goes again now
        for parts in self._inflight.values():
            self.sock.send_multipart(parts, copy=False)
        self._last_progress = time.monotonic()

    def _read_acks(self, timeout_ms: int) -> None:
        import json

        while self.sock.poll(timeout_ms, zmq.POLLIN):
            timeout_ms = 0
            reply = self.sock.recv_multipart()
            try:
                ack = json.loads(reply[-1])
            except (ValueError, IndexError):
                continue
            if not isinstance(ack, dict):
                continue
            seq, status = ack.get("seq"), ack.get("status")
            if status in ("busy", "dropped"):  # not taken, or taken and not processed: it must go again
                if seq in self._inflight:
                    now = time.monotonic()
                    self._last_progress = self._last_refusal = now  # the node is there
                    self._resend_from = seq if self._resend_from is None else min(self._resend_from, seq)
                    if self._resend_at is None:
                        self._resend_at = now + self._backoff
                        self._backoff = min(_BACKOFF_MAX_S, self._backoff * 2)
                continue
            if seq in self._inflight:
                del self._inflight[seq]
                self.acked += 1
                self._last_progress = self._last_ack = time.monotonic()
                if self._last_ack - self._last_refusal > _BACKOFF_MAX_S:  # refusals are over: back to a quick resend
                    self._backoff = _BACKOFF_MIN_S
                if status == "rejected":
                    self.rejected += 1
                    _logger.warning("frame %s rejected: %s", seq, ack.get("error"))
                if status == "processed":  # a frame left the node's queue: room for one refused frame
                    self._resend_one()

    def _resend_one(self) -> None:
        """A frame done makes room in the node's queue: the oldest refused frame goes again now, one for
        one (no storm of resends while the node is full; the back-off timer resends the rest)."""
        if self._resend_from is None:
            return
        later = [q for q in self._inflight if q >= self._resend_from]
        if not later:
            self._resend_from = self._resend_at = None
            return
        try:
            self.sock.send_multipart(self._inflight[later[0]], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        self.resends += 1
        if len(later) > 1:
            self._resend_from = later[1]
        else:  # every refused frame went again
            self._resend_from = self._resend_at = None

    def _resend_if_due(self) -> None:
        if self._resend_at is not None and time.monotonic() >= self._resend_at:
            start, self._resend_at, self._resend_from = self._resend_from, None, None
            self.resends += 1  # the fallback: everything from the first refused frame on
            for seq, parts in self._inflight.items():  # in order: the node takes a refused frame before later ones
                if start is not None and seq < start:
                    continue  # taken by the node and waiting there: not sent again
                try:
                    self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:  # the socket is full: this one and the rest go at the next try, in order
                    self._resend_from, self._resend_at = seq, time.monotonic() + self._backoff
                    break

    def _wait_step(self) -> None:
        """Read acks for a moment; resend after busy/dropped; reconnect after the ack timeout."""
        self._read_acks(20 if self._resend_from is not None else 100)
        self._resend_if_due()
        if self._inflight and time.monotonic() - self._last_progress > self.ack_timeout:
            self._reconnect_and_resend()

    def send(self, image, stamp_ns: Optional[int] = None, K=None, reset: bool = False) -> bool:
        """Send one ``(H, W, 3)`` uint8 RGB frame; returns False if it was dropped (live mode)."""
        parts = wire.encode_frame(image, self.stream_id, self.seq, encoding=self.encoding, stamp_ns=stamp_ns, K=K,
                                  reset=reset, ack=self.lossless, lossless=self.lossless, session=self.session,
                                  quality=self.quality)
        seq = self.seq
        self.seq += 1
        if not self.lossless:
            try:
                self.sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                self.sent += 1
                return True
            except zmq.Again:
                self.dropped += 1
                return False
        while len(self._inflight) >= self.window or self._resend_from is not None:  # refused frames go first
            self._wait_step()
            if len(self._inflight) >= self.window and self.give_up_s is not None \
                    and time.monotonic() - self._last_ack > self.give_up_s:
                raise NodeUnreachable(f"no frame processed for {self.give_up_s:.0f} s by {self.endpoint}")
        self._inflight[seq] = parts
        self.sock.send_multipart(parts, copy=False)
        self.sent += 1
        self._read_acks(0)
        return True

    def flush(self, timeout: float = 30.0) -> bool:
        """Lossless: wait until every frame is acknowledged (True) or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            self._wait_step()
            if self.give_up_s is not None and time.monotonic() - self._last_ack > self.give_up_s:
                break
        return not self._inflight

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def stats(self) -> dict:
        return {"sent": self.sent, "dropped": self.dropped, "acked": self.acked, "unacked": len(self._inflight),
                "reconnects": self.reconnects, "resends": self.resends, "rejected": self.rejected}


class NodeUnreachable(RuntimeError):
    """Lossless frames waited longer than ``give_up_s`` without any acknowledgement."""


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="camera (0, cam:0, /dev/video0), video file, or image folder")
    ap.add_argument("--connect", default="tcp://127.0.0.1:5555", help="the node's ingest endpoint")
    ap.add_argument("--stream-id", required=True)
    ap.add_argument("--encoding", default="rgb8", choices=sorted(wire.ENCODINGS))
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--fps", type=float, default=0.0, help="send at most this many frames per second (0 = as fast as read)")
    ap.add_argument("--lossless", action="store_true", help="deliver every frame (acks, backpressure, resend)")
    ap.add_argument("--window", type=int, default=4, help="unacknowledged frames allowed (lossless)")
    ap.add_argument("--ack-timeout", type=float, default=5.0)
    ap.add_argument("--max-frames", type=int, default=0)
    ap.add_argument("--give-up-after", type=float, default=30.0,
                    help="lossless: exit 1 after this many seconds without any acknowledgement (no node, or a node "
                         "that stopped), while sending and at the end")
    ap.add_argument("--curve-server-key", help="the node's public key file (enables CURVE)")
    ap.add_argument("--curve-client-key", help="this client's secret key file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not wire.valid_stream_id(args.stream_id):
        print(f"camera_pub: invalid --stream-id {args.stream_id!r}: use 1-128 letters, digits and . _ : @ -, "
              "starting with a letter or digit", file=sys.stderr)
        return 2
    from streamrecon.sources import SourceError, open_source

    try:
        source = open_source(args.source)
    except SourceError as e:
        print(f"camera_pub: {e}", file=sys.stderr)
        return 2
    curve = (args.curve_server_key, args.curve_client_key) if args.curve_server_key else None
    pub = Publisher(args.connect, args.stream_id, args.encoding, args.lossless, args.window, args.ack_timeout, curve,
                    args.quality)
    pub.give_up_s = args.give_up_after
    period, next_t, n = (1.0 / args.fps if args.fps > 0 else 0.0), time.monotonic(), 0
    interrupted = False
    delivered = True
    try:
        for frame in source:
            if period:
                next_t += period
                time.sleep(max(0.0, next_t - time.monotonic()))
            pub.send(frame.image, stamp_ns=int(frame.stamp * 1e9), K=frame.K)
            n += 1
            if args.max_frames and n >= args.max_frames:
                break
        delivered = pub.flush(timeout=args.give_up_after)
    except KeyboardInterrupt:
        interrupted = True
    except NodeUnreachable as e:
        delivered = False
        print(f"camera_pub: {e}", file=sys.stderr)
    finally:
        source.close()
        pub.close()
    print(f"camera_pub {args.stream_id}: {pub.stats()} (source dropped {source.stats.dropped})", file=sys.stderr)
    if interrupted:
        return 130
    if args.lossless and not delivered:
        print(f"camera_pub: error: {pub.stats()['unacked']} of {pub.sent} frames were never acknowledged by the node "
              f"(is `streamrecon serve` running at {args.connect}?)", file=sys.stderr)
        return 1
    if args.lossless and pub.rejected:
        print(f"camera_pub: error: the node rejected {pub.rejected} of {pub.sent} frames (see the warnings above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
