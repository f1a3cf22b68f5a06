"""Pinhole cameras: pixel grids, raymaps for the raymap encoder, focal estimation from pointmaps.

Pixels are indexed ``u`` = column, ``v`` = row, integers, no half-pixel offset (reference
convention). Intrinsics ``K`` are ``(*, 3, 3)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pixel_grid", "raymap", "pseudo_intrinsics", "principal_point", "estimate_focal", "intrinsics_matrix"]


def pixel_grid(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """``(H, W, 2)`` pixel coordinates ``(u, v)``."""
    v, u = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                          indexing="ij")
    return torch.stack([u, v], dim=-1)


def intrinsics_matrix(focal: Tensor, pp: Tensor) -> Tensor:
    """``(B,)`` focal and ``(B, 2)`` principal point -> ``(B, 3, 3)`` K with ``fx = fy``."""
    K = torch.zeros(focal.shape + (3, 3), dtype=focal.dtype, device=focal.device)
    K[..., 0, 0] = focal
    K[..., 1, 1] = focal
    K[..., :2, 2] = pp
    K[..., 2, 2] = 1
    return K


def pseudo_intrinsics(h: int, w: int, dtype=torch.float32) -> Tensor:
    """The reference viewer's default camera: ``f = sqrt(H^2 + W^2)``, pp ``(W//2, H//2)``; ``(3, 3)``."""
    f = math.sqrt(h * h + w * w)
    return torch.tensor([[f, 0, w // 2], [0, f, h // 2], [0, 0, 1]], dtype=dtype)


def principal_point(h: int, w: int, batch: int = 1, device=None, dtype=torch.float32) -> Tensor:
    """``(B, 2)`` principal point the reference demo assumes: ``(W//2, H//2)``."""
    return torch.tensor([w // 2, h // 2], device=device, dtype=dtype).expand(batch, 2).clone()


def raymap(T_wc: Tensor, K: Tensor, h: int, w: int) -> Tensor:
    """Raymap of a camera as the reference builds it for training views and its viewer.

    Channels 0..2 are the camera centre; channels 3..5 are ``normalise(T_wc @ [K^-1 [u, v, 1]; 1])``:
    the depth-1 point of each pixel mapped *as a point* (translation included) and then normalised.
    This is the ray direction only when the centre is at the origin; reproduced literally.

    Args:
        T_wc: ``(B, 4, 4)`` camera-to-world in the model's world frame.
        K: ``(B, 3, 3)`` intrinsics.
        h, w: image size.

    Returns:
        ``(B, H, W, 6)`` in the dtype of ``T_wc`` (compute in float64 for reference-exact values).
    """
    b = T_wc.shape[0]
    uv1 = torch.cat([pixel_grid(h, w, T_wc.device, T_wc.dtype), torch.ones(h, w, 1, dtype=T_wc.dtype,
                                                                            device=T_wc.device)], -1)
    cam = uv1.reshape(1, -1, 3) @ torch.linalg.inv(K).transpose(-1, -2)  # (B, HW, 3) depth-1 points
    world = cam @ T_wc[:, :3, :3].transpose(-1, -2) + T_wc[:, None, :3, 3]
    dirs = world / world.norm(dim=-1, keepdim=True)
    origin = T_wc[:, None, :3, 3].expand(b, h * w, 3)
    return torch.cat([origin, dirs], dim=-1).reshape(b, h, w, 6)


def estimate_focal(points_cam: Tensor, pp: Tensor, iterations: int = 10, min_focal: float = 0.0,
                   max_focal: float = math.inf) -> Tensor:
    """Focal length of a camera-frame pointmap by Weiszfeld re-weighted least squares (reference demo).

    With pixel offsets ``p = (u, v) - pp`` and ``r = (x/z, y/z)`` (non-finite set to 0), start from
    ``f = mean(p.r) / mean(r.r)`` and iterate ``w = 1/max(|p - f r|, 1e-8)``,
    ``f = mean(w p.r) / mean(w r.r)``. The result is clipped to ``[min, max] * focal_base`` with
    ``focal_base = max(H, W) / (2 tan 30 deg)``.

    Args:
        points_cam: ``(B, H, W, 3)`` points in the camera frame.
        pp: ``(B, 2)`` principal point ``(cx, cy)``.

    Returns:
        ``(B,)`` focal lengths in pixels (``fx = fy``).
    """
    b, h, w, _ = points_cam.shape
    pixels = pixel_grid(h, w, points_cam.device, points_cam.dtype).reshape(1, -1, 2) - pp.reshape(-1, 1, 2)
    pts = points_cam.reshape(b, -1, 3)
    xy_over_z = (pts[..., :2] / pts[..., 2:3]).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    dot_xy_px = (xy_over_z * pixels).sum(dim=-1)
    dot_xy_xy = xy_over_z.square().sum(dim=-1)
    focal = dot_xy_px.mean(dim=1) / dot_xy_xy.mean(dim=1)
    for _ in range(iterations):
        dist = (pixels - focal.view(-1, 1, 1) * xy_over_z).norm(dim=-1)
        weight = dist.clip(min=1e-8).reciprocal()
        focal = (weight * dot_xy_px).mean(dim=1) / (weight * dot_xy_xy).mean(dim=1)
    focal_base = max(h, w) / (2 * math.tan(math.radians(60) / 2))
    return focal.clip(min=min_focal * focal_base, max=max_focal * focal_base)
