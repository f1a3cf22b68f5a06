"""``streamrecon serve``: the ZeroMQ node (frames in, poses/geometry out, control channel)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from . import UserError, read_settings

__all__ = ["register"]

_logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the ZeroMQ node for many camera streams",
                       description="Bind an ingest socket (frames, imagezmq compatible), a results PUB socket and a "
                                   "control socket. Loopback only unless --allow-remote. See docs/PROTOCOL.md.")
    S = argparse.SUPPRESS
    p.add_argument("--config", default=None, help="YAML file with any of the settings below")
    p.add_argument("--weights", default=S, help="checkpoint (.pth or .safetensors)")
    p.add_argument("--ingest", default=S, help="frames in (tcp://127.0.0.1:5555)")
    p.add_argument("--results", default=S, help="results PUB (tcp://127.0.0.1:5556)")
    p.add_argument("--control", default=S, help="control request/reply (tcp://127.0.0.1:5557)")
    p.add_argument("--subscribe", action="append", default=S, help="connect a SUB to an imagezmq PUB sender (repeatable)")
    p.add_argument("--allow-remote", action="store_true", default=S, help="allow binding non-loopback addresses")
    p.add_argument("--curve-secret-key", default=S, help="node certificate (zmq.auth .key_secret): enables CURVE")
    p.add_argument("--curve-clients", default=S, help="directory of allowed client public keys")
    p.add_argument("--device", default=S)
    p.add_argument("--size", type=int, default=S)
    p.add_argument("--state-policy", choices=["cut3r", "ttt3r"], default=S)
    p.add_argument("--reset-every", type=int, default=S)
    p.add_argument("--conf-thresh", type=float, default=S,
                   help="map confidence threshold (default: the checkpoint's recommendation, else 1.5)")
    p.add_argument("--voxel-size", type=float, default=S)
    p.add_argument("--max-points", type=int, default=S)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=S, help="autocast of the trunk (fp32)")
    p.add_argument("--lossless", action="store_true", default=S, help="every stream lossless by default")
    p.add_argument("--max-streams", type=int, default=S, help="concurrent stream cap (16)")
    p.add_argument("--idle-timeout-s", type=float, default=S, help="close a stream after this long without frames (60)")
    p.add_argument("--max-batch", type=int, default=S, help="streams stepped together in one model call (8)")
    p.add_argument("--geometry-stride", type=int, default=S, help="pixel stride of published pointmaps; 0 = none (4)")
    p.add_argument("--status-interval-s", type=float, default=S)
    p.add_argument("--max-message-bytes", type=int, default=S)
    p.add_argument("--output-dir", default=S, help="where stream maps/trajectories go (outputs/serve)")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ..server import Node, ServeConfig

    values = read_settings(args.config, ServeConfig.field_names()) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in ("config", "handler", "command", "verbose")})
    try:
        node = Node(ServeConfig(**values))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise UserError(str(e)) from None

    def on_signal(signum, _frame):
        _logger.warning("%s: flushing every stream and stopping", signal.Signals(signum).name)
        node.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
    eps = node.endpoints
    print(f"streamrecon node: ingest {eps['ingest']}  results {eps['results']}  control {eps['control']}", flush=True)
    node.serve_forever()
    print("streamrecon node stopped; stream outputs in", node.output_dir, flush=True)
    return 0
