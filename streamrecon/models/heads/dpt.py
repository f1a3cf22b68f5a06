"""DPT pointmap adapter (the 512 model's head), CroCo/DUSt3R layout.

Four token maps (encoder tokens and three decoder levels) are reassembled at strides 4, 8, 16 and
32 of the patch grid, projected to ``feature_dim`` channels, fused coarse-to-fine with residual
conv units and bilinear (align_corners) upsampling, and decoded to ``out_channels`` per pixel.
Attribute names reproduce the reference state-dict keys, including the ``scratch.layer_rn``
aliases of ``scratch.layer{1..4}_rn``.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DPTAdapter"]


def _upsample2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class _Upsample2(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return _upsample2(x)


class ResidualConvUnit(nn.Module):
    """``conv2(relu(conv1(relu(x)))) + x`` with 3x3 convolutions."""

    def __init__(self, features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, device=device, dtype=dtype)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FusionBlock(nn.Module):
    """``out_conv(up2(RCU2(a + RCU1(b))))`` (``b`` optional)."""

    def __init__(self, features: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.out_conv = nn.Conv2d(features, features, 1, **dd)
        self.resConfUnit1 = ResidualConvUnit(features, **dd)
        self.resConfUnit2 = ResidualConvUnit(features, **dd)

    def forward(self, a: Tensor, b: Tensor | None = None) -> Tensor:
        out = a if b is None else a + self.resConfUnit1(b)
        return self.out_conv(_upsample2(self.resConfUnit2(out)))


class _Scratch(nn.Module):
    def __init__(self, layer_dims: Sequence[int], features: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        convs = [nn.Conv2d(d, features, 3, padding=1, bias=False, **dd) for d in layer_dims]
        self.layer1_rn, self.layer2_rn, self.layer3_rn, self.layer4_rn = convs
        self.layer_rn = nn.ModuleList(convs)  # same modules under a second name (reference keys)
        self.refinenet1 = FusionBlock(features, **dd)
        self.refinenet2 = FusionBlock(features, **dd)
        self.refinenet3 = FusionBlock(features, **dd)
        self.refinenet4 = FusionBlock(features, **dd)


class DPTAdapter(nn.Module):
    """Dense prediction from four token maps.

    Args:
        in_dims: widths of the four inputs (encoder width, then three decoder widths).
        out_channels: output channels per pixel (4 = xyz + confidence, 3 = rgb).
        layer_dims: per-level widths after reassembly (reference: 96, 192, 384, 768).
        feature_dim: fusion width (reference: 256).
        last_dim: width of the last hidden conv (reference: 128).
        patch_size: patch side (16); the output is ``patch_size`` times the token grid.
    """

    def __init__(self, in_dims: Sequence[int], out_channels: int, layer_dims: Sequence[int],
                 feature_dim: int, last_dim: int, patch_size: int = 16, device=None, dtype=None) -> None:
        super().__init__()
        if patch_size != 16:
            raise ValueError("the DPT adapter is built for 16-pixel patches")
        dd = {"device": device, "dtype": dtype}
        d0, d1, d2, d3 = layer_dims
        self.scratch = _Scratch(layer_dims, feature_dim, **dd)
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1, **dd),
            _Upsample2(),
            nn.Conv2d(feature_dim // 2, last_dim, 3, padding=1, **dd),
            nn.ReLU(),
            nn.Conv2d(last_dim, out_channels, 1, **dd),
        )
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_dims[0], d0, 1, **dd), nn.ConvTranspose2d(d0, d0, 4, stride=4, **dd)),
            nn.Sequential(nn.Conv2d(in_dims[1], d1, 1, **dd), nn.ConvTranspose2d(d1, d1, 2, stride=2, **dd)),
            nn.Sequential(nn.Conv2d(in_dims[2], d2, 1, **dd)),
            nn.Sequential(nn.Conv2d(in_dims[3], d3, 1, **dd), nn.Conv2d(d3, d3, 3, stride=2, padding=1, **dd)),
        ])

    def forward(self, tokens: Sequence[Tensor], grid_hw: tuple[int, int]) -> Tensor:
        """Four ``(B, N, C_i)`` token maps on an ``(Hp, Wp)`` grid -> ``(B, H, W, out_channels)``."""
        hp, wp = grid_hw
        maps = [t.transpose(1, 2).reshape(t.shape[0], t.shape[2], hp, wp) for t in tokens]
        l1, l2, l3, l4 = [rn(post(m)) for post, rn, m in zip(self.act_postprocess, self.scratch.layer_rn, maps)]
        path4 = self.scratch.refinenet4(l4)[:, :, : l3.shape[2], : l3.shape[3]]
        path3 = self.scratch.refinenet3(path4, l3)
        path2 = self.scratch.refinenet2(path3, l2)
        path1 = self.scratch.refinenet1(path2, l1)
        return self.head(path1).permute(0, 2, 3, 1)
