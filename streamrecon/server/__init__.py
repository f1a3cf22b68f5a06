"""The ZeroMQ node (``streamrecon serve``): multi-stream ingest, batched stepping, results, control."""

from .config import ServeConfig, is_loopback_endpoint
from .node import Node

__all__ = ["Node", "ServeConfig", "is_loopback_endpoint"]
