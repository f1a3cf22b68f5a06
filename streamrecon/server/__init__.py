"""The ZeroMQ node (``streamrecon serve``): multi-stream ingest, batched stepping, results, control.

``ServeConfig`` is torch-free; ``Node`` (which needs the model) is imported on first use.
"""

from .config import ServeConfig, is_loopback_endpoint

__all__ = ["Node", "ServeConfig", "is_loopback_endpoint"]


def __getattr__(name: str):
    if name == "Node":
        from .node import Node

        return Node
    raise AttributeError(name)
