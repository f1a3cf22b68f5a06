"""``ResultPublisher``: a stream's results on the node's ZeroMQ PUB socket (``serve``).

Per frame ``<stream>/pose`` (JSON header: seq, stamps, latency, index, segment, ``T_wc``, ``K``,
``K_original``, ``K_given`` or null, stage timings) and, every ``geometry_stride``-th pixel,
``<stream>/geometry`` (float16 world points and confidences, uint8 colours). Sending never blocks
(the socket is NOBLOCK: a slow subscriber only loses messages, counted by the node). It runs on the
node's loop thread, which owns the socket (ZeroMQ sockets are not thread-safe), so it is not put
behind a background queue; its work is a JSON dump and a strided float16 copy.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

import numpy as np

from ..frames import ProbeResult
from ..wire import encode_result
from .base import FrameEvent, StreamClosed

__all__ = ["ResultPublisher"]


class ResultPublisher:
    """Args:
        send: ``send(parts)`` onto the PUB socket (the node's non-blocking sender).
        stream_id: topic prefix.
        geometry_stride: pixel stride of published world pointmaps (0 = none).
        map_points: ``pose`` or ``head`` (which world points to publish).
    """

    name = "results"

    def __init__(self, send: Callable[[list], None], stream_id: str, geometry_stride: int = 4,
                 map_points: str = "pose") -> None:
        self.send, self.stream_id, self.geometry_stride, self.map_points = send, stream_id, geometry_stride, map_points
        self.published = 0
        self.latency_ms: deque = deque(maxlen=1000)

    def on_frame(self, event: FrameEvent) -> None:
        r, ctx = event.result, event.context
        pub_ns = time.time_ns()
        recv_ns = ctx.get("recv_ns", pub_ns)
        stamp_ns = ctx.get("stamp_ns", int(round(r.stamp * 1e9)))
        latency_ms = (pub_ns - recv_ns) / 1e6
        self.latency_ms.append(latency_ms)
        header = {"seq": r.seq, "stamp_ns": stamp_ns, "recv_ns": recv_ns, "pub_ns": pub_ns,
                  "latency_ms": round(latency_ms, 3), "index": r.index, "segment": r.segment,
                  "T_wc": r.T_wc.reshape(-1).tolist(), "K": r.K.reshape(-1).tolist(),
                  "K_original": r.K_original.reshape(-1).tolist(),
                  "K_given": r.K_given.reshape(-1).tolist() if r.K_given is not None else None,
                  "stages_ms": {k: round(v, 3) for k, v in r.timings_ms.items()},
                  "tracking": None if r.tracking is None else
                  {"state": r.tracking.state, "method": r.tracking.method, "inliers": r.tracking.inliers,
                   "keyframe": r.tracking.keyframe, "localised": r.tracking.localised,
                   "depth_fit": r.tracking.depth_fit}}
        self.send(encode_result(self.stream_id, "pose", header))
        self.published += 1
        g = self.geometry_stride
        if g:
            for d in event.dense_results():  # --network-every: the network's frames, when they arrive
                self._geometry(d, g, int(round(d.stamp * 1e9)) if d is not r else stamp_ns)

    def _geometry(self, r, g: int, stamp_ns: int) -> None:
        pts, conf = r.world_points(self.map_points)
        self.send(encode_result(
            self.stream_id, "geometry", {"seq": r.seq, "stamp_ns": stamp_ns, "stride": g, "frame": "world"},
            {"points": pts[::g, ::g].astype(np.float16), "conf": conf[::g, ::g].astype(np.float16),
             "colors": r.colors[::g, ::g],
             **({} if r.dynamic_mask is None else {"dynamic_mask": r.dynamic_mask[::g, ::g].astype(np.uint8)})}))

    def on_probe(self, probe: ProbeResult) -> None:
        pass  # probes are answered on the control channel

    def close(self, final: StreamClosed) -> None:
        """The network's last frames (``--network-every``: arrived at close) still go out as geometry;
        the node publishes the closing status itself."""
        if self.geometry_stride:
            for d in getattr(final, "dense", ()) or ():
                self._geometry(d, self.geometry_stride, int(round(d.stamp * 1e9)))

    def latency_percentiles(self) -> tuple[float, float]:
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
        return float(np.percentile(lat, 50)), float(np.percentile(lat, 99))
