"""``streamrecon serve``: the ZeroMQ node (frames in, poses/geometry out, control channel).

Flags come from :class:`ServeConfig` and the shared :class:`PipelineConfig` (the same engine, map and
output flags as ``streamrecon run``); ``--config`` reads a YAML file with sections
``engine:`` / ``map:`` / ``outputs:`` and the node's own settings at the top level.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from .flags import add_settings_flags, settings_from_args

__all__ = ["register"]

_logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    from ..cluster.config import ClusterSettings
    from ..server.config import ServeConfig
    from ..settings import EngineSettings, MapSettings, OutputSettings, SlamSettings

    p = sub.add_parser("serve", help="run the ZeroMQ node for many camera streams",
                       description="Bind an ingest socket (frames, imagezmq compatible), a results PUB socket and a "
                                   "control socket. Loopback only unless --allow-remote. See docs/PROTOCOL.md. "
                                   "Each stream's outputs go to OUTPUT_DIR/streams/<id>/ (default outputs/serve).")
    p.add_argument("--config", default=None, help="YAML file with sections engine:/map:/outputs: and the node settings")
    add_settings_flags(p, (ServeConfig, EngineSettings, MapSettings, OutputSettings, SlamSettings, ClusterSettings))
    p.add_argument("--ray", nargs="?", const="local", default=argparse.SUPPRESS, metavar="ADDRESS",
                   help="scale out on Ray: worker actors step the streams, this process keeps the sockets (ADDRESS: "
                        "a running cluster, e.g. 10.0.0.1:6379; without it, a Ray instance on this machine). "
                        "Needs streamrecon[ray]; see the README's 'Scale-out on Ray'")
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ..cluster.config import ClusterSettings
    from ..server import ServeConfig
    from ..settings import SettingsError, load_yaml

    flags = settings_from_args(args)
    cluster = ClusterSettings.pop_from(flags)
    values = load_yaml(args.config, ServeConfig) if args.config else {}
    values.update(flags)
    cfg = ServeConfig.of(**values)
    if cluster.ray is None:
        given = [k for k in ClusterSettings.__dataclass_fields__ if k in vars(args)]
        if given:
            raise SettingsError(f"--{given[0].replace('_', '-')} is a --ray setting: add --ray [ADDRESS]")
        from ..server import Node

        node = Node(cfg)
    else:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SettingsError("--ray needs Ray: pip install 'streamrecon[ray]'") from None
        from ..cluster import Gateway

        node = Gateway(cfg, cluster)

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
