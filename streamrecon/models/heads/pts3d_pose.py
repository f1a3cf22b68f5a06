"""The two CUT3R heads: ``DPTPts3dPose`` (512 model) and ``LinearPts3dPose`` (224 model).

Both read the decoder outputs ``[feat, x_{D/2}, x_{3D/4}, x_D]`` (``x_D`` still holding the pose
token at index 0), predict the camera pose from the pose token, condition the image tokens on it
with two modulation blocks for the world-frame pointmap, and decode three dense maps:
self-view points + confidence, world points + confidence, and colours.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import ModelConfig
from ...layers import Mlp, ModulationBlock
from ...layers.rope import RopeTables
from .activations import confidence_activation, pointmap_activation, pose_activation, rgb_activation
from .dpt import DPTAdapter

__all__ = ["HeadOutput", "PoseHead", "DPTPts3dPose", "LinearPts3dPose", "build_head"]

HeadOutput = dict  # keys: points_cam, conf_cam, rgb, pose, points_world, conf_world


class PoseHead(nn.Module):
    """Pose MLP ``dd -> 4dd -> 7`` on the (normalised) pose token."""

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.mlp = Mlp(dim, 4 * dim, 7, device=device, dtype=dtype)

    def forward(self, token: Tensor) -> Tensor:
        """``(B, dd)`` -> raw ``(B, 7)``."""
        return self.mlp(token)


class _Pts3dPoseBase(nn.Module):
    """Shared pose + modulation logic; subclasses define the three dense decoders."""

    cfg: ModelConfig

    def _make_modulation(self, cfg: ModelConfig, dd: dict) -> nn.ModuleList:
        return nn.ModuleList([ModulationBlock(cfg.dec_embed_dim, cfg.dec_num_heads, 4.0, **dd) for _ in range(2)])

    def _pose_and_cross_tokens(self, x_last: Tensor, rope: Optional[RopeTables],
                               minimal: bool = False) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(pose, image tokens, pose-modulated tokens for the world head)``; the last is ``None`` when
        ``minimal`` (the world head is not computed)."""
        pose_token = x_last[:, 0]
        tokens = x_last[:, 1:]
        cross = None if minimal else tokens
        if cross is not None:
            for blk in self.final_transform:
                cross = blk(cross, pose_token, rope)
        return pose_activation(self.pose_head(pose_token), self.cfg.pose_mode), tokens, cross

    def _pointmap(self, raw: Tensor) -> tuple[Tensor, Tensor]:
        return pointmap_activation(raw[..., :3], self.cfg.depth_mode), confidence_activation(raw[..., 3], self.cfg.conf_mode)


class DPTPts3dPose(_Pts3dPoseBase):
    """DPT head: ``dpt_self`` (self pointmap), ``dpt_cross`` (world pointmap), ``dpt_rgb``."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        in_dims = (cfg.enc_embed_dim, cfg.dec_embed_dim, cfg.dec_embed_dim, cfg.dec_embed_dim)
        kw = dict(layer_dims=cfg.dpt_layer_dims, feature_dim=cfg.dpt_feature_dim, last_dim=cfg.dpt_last_dim,
                  patch_size=cfg.patch_size, **dd)
        # registration order = reference state-dict order
        self.dpt_self = DPTAdapter(in_dims, 4, **kw)
        self.final_transform = self._make_modulation(cfg, dd)
        self.dpt_cross = DPTAdapter(in_dims, 4, **kw)
        self.dpt_rgb = DPTAdapter(in_dims, 3, **kw) if cfg.rgb_head else None
        self.pose_head = PoseHead(cfg.dec_embed_dim, **dd)

    def forward(self, layers: Sequence[Tensor], grid_hw: tuple[int, int], rope: Optional[RopeTables],
                minimal: bool = False) -> HeadOutput:
        """``layers`` = ``[feat (B,N,ed), x_{D/2} (B,N,dd), x_{3D/4} (B,N,dd), x_D (B,1+N,dd)]``;
        ``minimal``: only the pose and the self-view pointmap (world pointmap, its confidence and the
        colours are ``None``; what is computed is the same)."""
        feat, mid1, mid2, x_last = layers
        pose, tokens, cross = self._pose_and_cross_tokens(x_last, rope, minimal)
        points_cam, conf_cam = self._pointmap(self.dpt_self([feat, mid1, mid2, tokens], grid_hw))
        points_world = conf_world = rgb = None
        if not minimal:
            points_world, conf_world = self._pointmap(self.dpt_cross([feat, mid1, mid2, cross], grid_hw))
            if self.dpt_rgb is not None:
                rgb = rgb_activation(self.dpt_rgb([feat, mid1, mid2, tokens], grid_hw))
        return dict(points_cam=points_cam, conf_cam=conf_cam, rgb=rgb, pose=pose,
                    points_world=points_world, conf_world=conf_world)


class LinearPts3dPose(_Pts3dPoseBase):
    """Linear head: per-token MLPs to ``C * p^2`` channels, pixel-shuffled to full resolution.

    The self pointmap is flipped by ``sign(z)`` before its activation (``z >= 0``), as the reference
    does for this head only.
    """

    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        dim, p2 = cfg.dec_embed_dim, cfg.patch_size**2
        self.proj = Mlp(dim, 4 * dim, 4 * p2, **dd)
        self.rgb_proj = Mlp(dim, 4 * dim, 3 * p2, **dd) if cfg.rgb_head else None
        self.pose_head = PoseHead(dim, **dd)
        self.final_transform = self._make_modulation(cfg, dd)
        self.cross_proj = Mlp(dim, 4 * dim, 4 * p2, **dd)

    def _dense(self, mlp: Mlp, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        hp, wp = grid_hw
        x = mlp(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, hp, wp)
        return F.pixel_shuffle(x, self.cfg.patch_size).permute(0, 2, 3, 1)

    def forward(self, layers: Sequence[Tensor], grid_hw: tuple[int, int], rope: Optional[RopeTables],
                minimal: bool = False) -> HeadOutput:
        """Same inputs as :meth:`DPTPts3dPose.forward` (only ``x_D`` is used)."""
        x_last = layers[-1]
        pose, tokens, cross = self._pose_and_cross_tokens(x_last, rope, minimal)
        raw_self = self._dense(self.proj, tokens, grid_hw)
        xyz = raw_self[..., :3] * torch.sign(raw_self[..., 2:3])  # pos_z
        points_cam = pointmap_activation(xyz, self.cfg.depth_mode)
        conf_cam = confidence_activation(raw_self[..., 3], self.cfg.conf_mode)
        points_world = conf_world = rgb = None
        if not minimal:
            points_world, conf_world = self._pointmap(self._dense(self.cross_proj, cross, grid_hw))
            if self.rgb_proj is not None:
                rgb = rgb_activation(self._dense(self.rgb_proj, tokens, grid_hw))
        return dict(points_cam=points_cam, conf_cam=conf_cam, rgb=rgb, pose=pose,
                    points_world=points_world, conf_world=conf_world)


def build_head(cfg: ModelConfig, device=None, dtype=None) -> nn.Module:
    """The head named by ``cfg.head_type``."""
    cls = {"dpt": DPTPts3dPose, "linear": LinearPts3dPose}[cfg.head_type]
    return cls(cfg, device=device, dtype=dtype)
