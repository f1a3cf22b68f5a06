"""The Ray worker actor: one per device (or CPU slot), holding many streams in a :class:`HostedNode`.

The class is plain Python; the gateway makes it an actor with ``ray.remote(StreamWorker).options(...)``
(``num_gpus``/``num_cpus`` from :class:`~streamrecon.cluster.config.ClusterSettings`), so importing this
module never needs Ray.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

__all__ = ["StreamWorker"]

_logger = logging.getLogger(__name__)


class StreamWorker:
    """Args:
        name: the worker's name in the gateway's status (``w0``, ``w1``, ...).
        cfg: the node's :class:`~streamrecon.server.config.ServeConfig` (sockets unused here).
        cpus: CPUs reserved for it (its torch threads).
    """

    def __init__(self, name: str, cfg, cpus: float) -> None:
        import torch

        from .hosted import HostedNode

        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s [{name}] %(name)s: %(message)s")
        torch.set_num_threads(max(1, math.ceil(cpus)))
        self.name = name
        self.node = HostedNode(cfg)

    def ready(self) -> dict[str, Any]:
        """Where it runs: process, Ray node, device."""
        import ray

        return {"name": self.name, "pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(),
                "gpus": [str(g) for g in ray.get_gpu_ids()], "device": str(getattr(self.node.model, "device", "cpu"))}

    def exchange(self, frames: list, payloads, control: list, ops: list):
        """Frames arrive as ``(envelope, header)``; their payloads as one object-store object, which Ray
        resolves before the call (``payloads``: a list of ``(N,)`` uint8 arrays, zero-copy views of the
        store); the rest is :meth:`HostedNode.exchange`."""
        parts = [[*env, header, payload] for (env, header), payload in zip(frames, payloads or [])]
        return self.node.exchange(parts, control, ops)

    def close(self):
        return self.node.close_all()
