"""Scale-out on Ray (``streamrecon serve --ray``): a gateway with the node's sockets, worker actors with its streams.

``ClusterSettings`` is Ray-free; ``Gateway`` (which needs Ray) is imported on first use.
"""

from .config import ClusterSettings

__all__ = ["ClusterSettings", "Gateway"]


def __getattr__(name: str):
    if name == "Gateway":
        from .gateway import Gateway

        return Gateway
    raise AttributeError(name)
