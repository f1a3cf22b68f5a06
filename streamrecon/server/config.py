"""Settings of ``streamrecon serve``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from typing import Optional
from urllib.parse import urlparse

__all__ = ["ServeConfig", "is_loopback_endpoint"]


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ``ipc://``/``inproc://`` and ``tcp://`` on 127.0.0.0/8, ``::1`` or ``localhost``."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = urlparse(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """Args (every one is also a ``streamrecon serve`` flag):
        ingest, results, control: endpoints the node binds (frames in, results PUB, control ROUTER).
        subscribe: imagezmq PUB senders to connect a SUB socket to (PUB/SUB mode of imagezmq).
        allow_remote: permit binding non-loopback addresses (a warning is logged without CURVE).
        curve_secret_key: the node's certificate (``zmq.auth`` ``.key_secret`` file): enables CURVE.
        curve_clients: directory of allowed client public keys (``.key`` files).
        lossless: default delivery mode of streams (a frame header's ``lossless`` overrides it).
        max_streams, idle_timeout_s: concurrent stream cap; close a stream after this long without frames.
        max_batch: at most this many streams stepped together in one model call (1 = no batching).
        lossless_queue: frames a lossless stream may have waiting (more are refused with status busy).
        geometry_stride: pixel stride of published world pointmaps (0 = publish no geometry).
        status_interval_s: heartbeat period of ``<stream>/status``.
        max_message_bytes: largest accepted message part (checked by ZeroMQ and again on decode).
    """

    ingest: str = "tcp://127.0.0.1:5555"
    results: str = "tcp://127.0.0.1:5556"
    control: str = "tcp://127.0.0.1:5557"
    subscribe: list[str] = field(default_factory=list)
    allow_remote: bool = False
    curve_secret_key: Optional[str] = None
    curve_clients: Optional[str] = None
    weights: Optional[str] = None
    device: str = "auto"
    size: Optional[int] = None
    state_policy: str = "cut3r"
    reset_every: int = 0
    conf_thresh: Optional[float] = None  # None: the model's recommendation (model_conf_thresh)
    voxel_size: float = 0.02
    max_points: int = 2_000_000
    budget_policy: str = "coarsen"
    pixel_stride: int = 2
    map_points: str = "pose"
    precision: str = "fp32"
    lossless: bool = False
    max_streams: int = 16
    idle_timeout_s: float = 60.0
    max_batch: int = 8
    lossless_queue: int = 64
    geometry_stride: int = 4
    status_interval_s: float = 1.0
    max_message_bytes: int = 64 * 2**20
    output_dir: str = "outputs/serve"

    def validate(self) -> None:
        for name in ("ingest", "results", "control"):
            ep = getattr(self, name)
            if not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"--{name} must be a tcp://, ipc:// or inproc:// endpoint, got {ep!r}")
            if not is_loopback_endpoint(ep) and not self.allow_remote:
                raise ValueError(f"--{name} {ep} is not a loopback address; pass --allow-remote to expose the node "
                                 "(and use --curve-secret-key to authenticate clients)")
        if bool(self.curve_secret_key) != bool(self.curve_clients):
            raise ValueError("CURVE needs both --curve-secret-key and --curve-clients")
        for name in ("max_streams", "max_batch", "lossless_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.geometry_stride < 0:
            raise ValueError("--geometry-stride must be >= 0")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
