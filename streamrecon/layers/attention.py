"""Self- and cross-attention with RoPE, a fused (SDPA) path and a plain-math fallback.

The fused path calls :func:`torch.nn.functional.scaled_dot_product_attention`; the fallback computes
``softmax(q k^T * scale) v`` explicitly. Both give the same function (tests check they agree); the
switch is global (:func:`set_fused_attn`, or ``STREAMRECON_FUSED_ATTN=0`` in the environment).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .onednn import linear
from .rope import RopeTables, apply_rope

__all__ = ["Attention", "CrossAttention", "attention", "use_fused_attn", "set_fused_attn", "fused_attn"]

_FUSED = os.environ.get("STREAMRECON_FUSED_ATTN", "1") not in ("0", "false", "False")


def use_fused_attn() -> bool:
    """Whether attention currently runs through ``scaled_dot_product_attention``."""
    return _FUSED


def set_fused_attn(enable: bool) -> None:
    """Switch every attention layer between SDPA (True) and the explicit softmax path (False)."""
    global _FUSED
    _FUSED = bool(enable)


@contextlib.contextmanager
def fused_attn(enable: bool) -> Iterator[None]:
    """Context manager form of :func:`set_fused_attn`."""
    previous = use_fused_attn()
    set_fused_attn(enable)
    try:
        yield
    finally:
        set_fused_attn(previous)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(q k^T * scale) v`` for ``(B, heads, N, Dh)`` tensors."""
    if _FUSED:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    logits = (q @ k.transpose(-2, -1)) * scale
    return logits.softmax(dim=-1) @ v


def _round_fp16(x: Tensor) -> Tensor:
    return x.to(torch.float16).to(torch.float32)


class Attention(nn.Module):
    """Multi-head self-attention with optional 2D RoPE on queries and keys.

    Args:
        dim: token width.
        num_heads: number of heads (``dim % num_heads == 0``).
        qk_fp16: round q and k to float16 around the RoPE rotation, as CroCo's image encoder does
            (q, k -> fp16 -> rotate in fp32 -> fp16 -> back). Needed for checkpoint-exact numerics.
    """

    def __init__(self, dim: int, num_heads: int, qk_fp16: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qk_fp16 = qk_fp16
        self.qkv = nn.Linear(dim, dim * 3, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: Tensor, rope: Optional[RopeTables] = None, probs: Optional[list] = None) -> Tensor:
        """``x`` ``(B, N, dim)`` -> ``(B, N, dim)``; ``rope`` tables for the N positions or None.

        ``probs``: a list to append the scaled attention logits ``(B, heads, N, N)`` (before the softmax)
        to (computed beside the output, which stays exactly what it is without it)."""
        b, n, c = x.shape
        q, k, v = linear(self.qkv, x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            if self.qk_fp16:
                dtype = q.dtype
                q = _round_fp16(apply_rope(_round_fp16(q), rope)).to(dtype)
                k = _round_fp16(apply_rope(_round_fp16(k), rope)).to(dtype)
            else:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
        if probs is not None:
            probs.append(((q @ k.transpose(-2, -1)) * self.scale).float())
        x = attention(q, k, v, self.scale)
        return linear(self.proj, x.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Multi-head cross-attention (queries from ``x``, keys and values from ``y``) with RoPE.

    Args:
        dim: token width of both inputs.
        num_heads: number of heads.
    """

    def __init__(self, dim: int, num_heads: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.projq = nn.Linear(dim, dim, **dd)
        self.projk = nn.Linear(dim, dim, **dd)
        self.projv = nn.Linear(dim, dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        rope_x: Optional[RopeTables] = None,
        rope_y: Optional[RopeTables] = None,
        logit_mean: bool = False,
        probs: Optional[list] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """Attend from ``x`` ``(B, Nq, dim)`` to ``y`` ``(B, Nk, dim)`` (``probs``: a list to append the
        scaled logits ``(B, heads, Nq, Nk)``, before the softmax, to; computed beside the unchanged output).

        Returns:
            ``(out, mean_logits)``: ``out`` ``(B, Nq, dim)``; with ``logit_mean=True``,
            ``mean_logits`` ``(B, heads, Nq)`` is the mean over keys of the scaled pre-softmax
            logits ``q.k * Dh**-0.5`` (else ``None``).
        """
        b, nq, c = x.shape
        q, k, v = (self._heads(linear(self.projq, x)), self._heads(linear(self.projk, y)),
                   self._heads(linear(self.projv, y)))
        if rope_x is not None:
            q = apply_rope(q, rope_x)
        if rope_y is not None:
            k = apply_rope(k, rope_y)
        mean_logits = None
        if logit_mean:
            # mean_n (q . k_n) * s == (q . mean_n k_n) * s: one matvec instead of the full logits
            mean_logits = (q @ k.mean(dim=2).unsqueeze(-1)).squeeze(-1) * self.scale
        if probs is not None:
            probs.append(((q @ k.transpose(-2, -1)) * self.scale).float())
        out = attention(q, k, v, self.scale)
        return linear(self.proj, out.transpose(1, 2).reshape(b, nq, c)), mean_logits
