"""2-D rotary position embedding (RoPE), as the compiled cuRoPE kernel of CroCo/CUT3R computes it.

For a head vector of size ``Dh`` (``Dh % 4 == 0``) and ``Q = Dh/4``: channels ``[0, Dh/2)`` rotate
with the token's row (y) coordinate, channels ``[Dh/2, Dh)`` with its column (x) coordinate. Inside
a half, channel ``j < Q`` pairs with ``j + Q`` and turns by ``theta_j = p * base**(-j/Q)``::

    u' = u cos(theta) - v sin(theta)
    v' = v cos(theta) + u sin(theta)

Angles come from the integer positions directly (no lookup table), so negative positions, such as
the pose token's ``(-1, -1)``, work. Everything is evaluated in float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RopeTables", "rope_tables", "apply_rope", "grid_positions", "state_positions"]


class RopeTables(NamedTuple):
    """Per-channel rotation of a set of positions.

    Attributes:
        cos: ``(B or 1, 1, N, Dh)`` float32 cosines, repeated over the (u, v) pair.
        sin: ``(B or 1, 1, N, Dh)`` float32 signed sines (``-sin`` on ``u``, ``+sin`` on ``v``).
    """

    cos: Tensor
    sin: Tensor


def rope_tables(pos: Tensor, head_dim: int, base: float = 100.0) -> RopeTables:
    """Rotation tables for integer positions.

    Args:
        pos: ``(B, N, 2)`` or ``(N, 2)`` integer ``(row, col)`` positions; may be negative.
        head_dim: per-head channel count ``Dh`` (multiple of 4).
        base: frequency base (100 for CUT3R).

    Returns:
        :class:`RopeTables` with ``(B or 1, 1, N, Dh)`` float32 tensors.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    if pos.ndim == 2:
        pos = pos.unsqueeze(0)
    q = head_dim // 4
    exponent = torch.arange(q, device=pos.device, dtype=torch.float32) / float(q)
    inv_freq = 1.0 / torch.pow(torch.tensor(base, dtype=torch.float32, device=pos.device), exponent)
    ang = pos.to(torch.float32).unsqueeze(-1) * inv_freq  # (B, N, 2, Q): [..., 0, :] rows, [..., 1, :] cols
    cos, sin = torch.cos(ang), torch.sin(ang)
    # channel layout [u_y | v_y | u_x | v_x], each Q wide
    cos_full = torch.cat([cos[..., 0, :], cos[..., 0, :], cos[..., 1, :], cos[..., 1, :]], dim=-1)
    sin_full = torch.cat([-sin[..., 0, :], sin[..., 0, :], -sin[..., 1, :], sin[..., 1, :]], dim=-1)
    return RopeTables(cos_full.unsqueeze(1), sin_full.unsqueeze(1))


def apply_rope(x: Tensor, tables: RopeTables) -> Tensor:
    """Rotate ``x`` ``(B, heads, N, Dh)`` by the tables (computed in the dtype of ``x``)."""
    q = x.shape[-1] // 4
    # swap u and v inside each half: [u_y, v_y, u_x, v_x] -> [v_y, u_y, v_x, u_x] (one cat: ~2x faster than flip)
    swapped = torch.cat([x[..., q:2 * q], x[..., :q], x[..., 3 * q:], x[..., 2 * q:3 * q]], dim=-1)
    return x * tables.cos.to(x.dtype) + swapped * tables.sin.to(x.dtype)


def grid_positions(h: int, w: int, device: torch.device | str | None = None) -> Tensor:
    """``(h*w, 2)`` int64 ``(row, col)`` positions of a row-major patch grid."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack([rows, cols], dim=-1)


def state_positions(num_tokens: int, mode: str, device: torch.device | str | None = None) -> Tensor | None:
    """``(S, 2)`` int64 positions of the state tokens, or ``None`` for ``mode='none'``.

    ``'2d'``: a grid of width ``w = floor(sqrt(S))`` rounded up to even, token ``i`` at
    ``(i // w, i % w)``. ``'1d'``: ``(i, i)``.
    """
    i = torch.arange(num_tokens, device=device)
    if mode == "2d":
        width = math.isqrt(num_tokens)
        if width % 2:
            width += 1
        return torch.stack([i // width, i % width], dim=-1)
    if mode == "1d":
        return torch.stack([i, i], dim=-1)
    if mode == "none":
        return None
    raise ValueError(f"unknown state position mode {mode!r}")
