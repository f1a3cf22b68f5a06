"""Settings of ``streamrecon serve``."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

from ..settings import OutputSettings, PipelineConfig, SettingsError, from_flat, setting, to_flat

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


@dataclass(frozen=True)
class ServeConfig:
    """Settings of ``streamrecon serve``: sockets, stream handling, and the shared
    :class:`~streamrecon.settings.PipelineConfig` each stream's pipeline is built from.
    ``ServeConfig.of(ingest=..., weights=..., voxel_size=...)`` builds one from flat names."""

    ingest: str = setting("tcp://127.0.0.1:5555", help="frames in (ROUTER; imagezmq compatible)")
    results: str = setting("tcp://127.0.0.1:5556", help="results out (PUB)")
    control: str = setting("tcp://127.0.0.1:5557", help="control request/reply (ROUTER)")
    subscribe: list[str] = setting(help="connect a SUB to an imagezmq PUB sender (repeatable)", factory=list, repeat=True)
    allow_remote: bool = setting(False, help="allow binding non-loopback addresses (use CURVE with it)")
    curve_secret_key: Optional[str] = setting(None, help="node certificate (zmq.auth .key_secret): enables CURVE")
    curve_clients: Optional[str] = setting(None, help="directory of allowed client public keys (.key files)")
    lossless: bool = setting(False, help="every stream lossless by default (a frame header's lossless overrides it)")
    max_streams: int = setting(16, help="concurrent stream cap")
    idle_timeout_s: float = setting(60.0, help="close a stream after this long without frames")
    max_batch: int = setting(8, help="streams stepped together in one model call (1 = no batching)")
    lossless_queue: int = setting(64, help="frames a lossless stream may have waiting (more are refused: busy)")
    geometry_stride: int = setting(4, help="pixel stride of published world pointmaps (0 = publish none)")
    status_interval_s: float = setting(1.0, help="heartbeat period of <stream>/status")
    max_message_bytes: int = setting(64 * 2**20, help="largest accepted message part (ZeroMQ drops larger ones; "
                                                       "a JPEG/PNG may not decode to more pixels than a raw frame this size)")
    drain_timeout_s: float = setting(30.0, help="at shutdown and close_stream, process the lossless frames already "
                                                "accepted for at most this long (the rest are acked dropped and resent)")
    max_probe_pixels: int = setting(512 * 512, help="largest query_raymap image (H x W): one probe costs the frame "
                                                    "loop about what a frame of that size does")
    restore: bool = setting(False, help="a stream that opens with the id of a stream snapshotted before (a node "
                                        "restart) continues from its latest snapshot in OUTPUT_DIR/snapshots/<id>")
    pipeline: PipelineConfig = field(default_factory=lambda: PipelineConfig(outputs=OutputSettings(output_dir="outputs/serve")))

    @classmethod
    def of(cls, **values: Any) -> "ServeConfig":
        """From flat setting names (pipeline settings go to their section; ``output_dir`` defaults to
        ``outputs/serve``)."""
        values.setdefault("output_dir", "outputs/serve")
        return from_flat(cls, values)

    def flat(self) -> dict[str, Any]:
        return to_flat(self)

    def validate(self) -> None:
        for name in ("ingest", "results", "control"):
            ep = getattr(self, name)
            if not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise SettingsError(f"--{name} must be a tcp://, ipc:// or inproc:// endpoint, got {ep!r}")
            if not is_loopback_endpoint(ep) and not self.allow_remote:
                raise SettingsError(f"--{name} {ep} is not a loopback address; pass --allow-remote to expose the node "
                                    "(and use --curve-secret-key to authenticate clients)")
        if bool(self.curve_secret_key) != bool(self.curve_clients):
            raise SettingsError("CURVE needs both --curve-secret-key and --curve-clients")
        if self.curve_clients:
            d = Path(self.curve_clients)
            if not d.is_dir():
                raise SettingsError(f"--curve-clients {d}: no such directory (it must hold the allowed clients' "
                                    "public .key files)")
            if not any(d.glob("*.key")):
                raise SettingsError(f"--curve-clients {d} holds no .key file: every client would be refused")
        if self.curve_secret_key and not Path(self.curve_secret_key).is_file():
            raise SettingsError(f"--curve-secret-key {self.curve_secret_key}: no such file")
        if not self.drain_timeout_s >= 0:
            raise SettingsError("--drain-timeout-s must be >= 0")
        if self.pipeline.engine.network_schedule() != 1:
            raise SettingsError("--network-every is for `streamrecon run` (one stream, tracked per frame); serve "
                                "batches the network over streams: leave it at 1")
        if self.max_probe_pixels < 256:
            raise SettingsError("--max-probe-pixels must be >= 256 (one 16 x 16 probe)")
        for name in ("max_streams", "max_batch", "lossless_queue"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be >= 1")
        if self.geometry_stride < 0:
            raise SettingsError("--geometry-stride must be >= 0")
        self.pipeline.validate()
