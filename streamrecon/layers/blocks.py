"""Transformer blocks of CUT3R: encoder ``Block``, two-input ``DecoderBlock`` and the head's
``ModulationBlock`` (AdaLN-style conditioning). Pre-norm, no layer scale, LayerNorm eps 1e-6."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .attention import Attention, CrossAttention
from .mlp import Mlp
from .rope import RopeTables

__all__ = ["Block", "DecoderBlock", "ModulationBlock", "ModulatedLayerNorm", "layer_norm"]

LN_EPS = 1e-6


def layer_norm(dim: int, device=None, dtype=None) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS, device=device, dtype=dtype)


class Block(nn.Module):
    """``x = x + Attn(LN1(x)); x = x + Mlp(LN2(x))``.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden/width ratio of the MLP.
        qk_fp16: float16 rounding of q/k around RoPE (image encoder only).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_fp16: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = layer_norm(dim, **dd)
        self.attn = Attention(dim, num_heads, qk_fp16=qk_fp16, **dd)
        self.norm2 = layer_norm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)

    def forward(self, x: Tensor, rope: Optional[RopeTables] = None) -> Tensor:
        """``(B, N, dim)`` -> ``(B, N, dim)``."""
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention on ``x``, cross-attention from ``x`` to ``LN_y(y)``, MLP.

    Args:
        dim: width of both token sets.
        num_heads: attention heads.
        mlp_ratio: hidden/width ratio of the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        # registration order = state-dict order of the reference
        self.norm1 = layer_norm(dim, **dd)
        self.attn = Attention(dim, num_heads, **dd)
        self.cross_attn = CrossAttention(dim, num_heads, **dd)
        self.norm2 = layer_norm(dim, **dd)
        self.norm3 = layer_norm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)
        self.norm_y = layer_norm(dim, **dd)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        rope_x: Optional[RopeTables] = None,
        rope_y: Optional[RopeTables] = None,
        logit_mean: bool = False,
        probs: Optional[dict] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``x`` ``(B, Nx, dim)`` reads ``y`` ``(B, Ny, dim)`` (unchanged).

        ``probs``: a dict whose lists ``self`` / ``cross`` (those present) get this block's scaled
        attention logits ``(B, heads, Nx, Nx)`` / ``(B, heads, Nx, Ny)`` (the outputs are unchanged by it).

        Returns:
            ``(x', mean_logits)`` with ``mean_logits`` ``(B, heads, Nx)`` from the cross-attention
            when ``logit_mean`` (see :class:`CrossAttention`), else ``None``.
        """
        x = x + self.attn(self.norm1(x), rope_x, None if probs is None else probs.get("self"))
        ca, mean_logits = self.cross_attn(self.norm2(x), self.norm_y(y), rope_x, rope_y, logit_mean,
                                          None if probs is None else probs.get("cross"))
        x = x + ca
        return x + self.mlp(self.norm3(x)), mean_logits


class ModulatedLayerNorm(nn.Module):
    """``LN(x) * (1 + scale) + shift`` with ``[shift | scale] = Linear(SiLU(c))``."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = layer_norm(dim, device=device, dtype=dtype)
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, device=device, dtype=dtype))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x`` ``(B, N, dim)``, condition ``c`` ``(B, dim)``."""
        shift, scale = self.mlp(c).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class ModulationBlock(nn.Module):
    """Self-attention block whose two norms are modulated by a per-sample condition vector.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: hidden/width ratio of the MLP.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.norm1 = ModulatedLayerNorm(dim, **dd)
        self.attn = Attention(dim, num_heads, **dd)
        self.norm2 = ModulatedLayerNorm(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd)

    def forward(self, x: Tensor, c: Tensor, rope: Optional[RopeTables] = None) -> Tensor:
        """``x`` ``(B, N, dim)`` conditioned on ``c`` ``(B, dim)``."""
        x = x + self.attn(self.norm1(x, c), rope)
        return x + self.mlp(self.norm2(x, c))
