"""LocalMemory ("pose retriever"): ``M`` slots of ``[key (dd) | value (dd)]``.

Each image frame writes ``[proj_q(g), p]`` (``g`` its mean encoder token, ``p`` its normalised pose
token output); the next frame reads a pose query from it with ``[proj_q(g), masked_token]``.
Plain DecoderBlocks of width ``2*dd`` without positional encoding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers import DecoderBlock

__all__ = ["LocalMemory"]


class LocalMemory(nn.Module):
    """Args:
        enc_dim: encoder width ``ed`` (input of ``proj_q``).
        dim: decoder width ``dd``; slots are ``2*dd`` wide.
        size: number of slots ``M``.
        num_heads: heads of the read/write blocks.
        depth: number of write blocks and of read blocks (2 in the reference).
    """

    def __init__(self, enc_dim: int, dim: int, size: int, num_heads: int, depth: int = 2,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.masked_token = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.mem = nn.Parameter(torch.zeros(1, size, 2 * dim, **dd))
        self.proj_q = nn.Linear(enc_dim, dim, **dd)
        self.write_blocks = nn.ModuleList([DecoderBlock(2 * dim, num_heads, 4.0, **dd) for _ in range(depth)])
        self.read_blocks = nn.ModuleList([DecoderBlock(2 * dim, num_heads, 4.0, **dd) for _ in range(depth)])

    def key(self, global_feat: Tensor) -> Tensor:
        """``(B, 1, ed)`` mean encoder token -> ``(B, 1, dd)`` memory key."""
        return self.proj_q(global_feat)

    def read(self, key: Tensor, mem: Tensor) -> Tensor:
        """Pose query ``(B, 1, dd)`` retrieved for ``key`` ``(B, 1, dd)`` from ``mem`` ``(B, M, 2dd)``."""
        q = torch.cat([key, self.masked_token.expand(key.shape[0], -1, -1)], dim=-1)
        for blk in self.read_blocks:
            q, _ = blk(q, mem)
        return q[..., self.dim:]

    def write(self, mem: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """Memory ``(B, M, 2dd)`` after writing ``[key | value]`` (both ``(B, 1, dd)``)."""
        token = torch.cat([key, value], dim=-1)
        for blk in self.write_blocks:
            mem, _ = blk(mem, token)
        return mem
