"""Patchify images (or raymaps) into tokens with a strided convolution."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PatchEmbed"]


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, N, dim)`` tokens, row-major over the ``(H/p, W/p)`` patch grid.

    Args:
        in_chans: input channels (3 for images, 6 for raymaps).
        dim: token width.
        patch_size: patch side ``p``; ``H`` and ``W`` must be multiples of it.
    """

    def __init__(self, in_chans: int, dim: int, patch_size: int = 16, device=None, dtype=None) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)
