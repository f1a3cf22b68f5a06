"""Output activations of the CUT3R heads, as pure functions.

``mode`` arguments are the reference triples ``(name, vmin, vmax)``, e.g. ``('exp', -inf, inf)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pointmap_activation", "confidence_activation", "pose_activation", "rgb_activation"]


def _unbounded(mode: tuple) -> bool:
    return mode[1] == -math.inf and mode[2] == math.inf


def pointmap_activation(xyz: Tensor, mode: tuple) -> Tensor:
    """Map raw 3-vectors ``(..., 3)`` to points: ``v/|v| * f(|v|)`` with ``f`` = expm1 for ``'exp'``.

    ``'linear'`` keeps ``v`` (clipped to ``[vmin, vmax]``), ``'square'`` uses ``|v|^2``.
    """
    name, vmin, vmax = mode
    if name == "linear":
        return xyz if _unbounded(mode) else xyz.clip(min=vmin, max=vmax)
    if not _unbounded(mode):
        raise ValueError(f"bounded {name!r} point activation is not supported: {mode}")
    xyz = xyz.contiguous()  # the heads hand over channels-last views; a strided norm is ~30x slower on CPU
    d = xyz.norm(dim=-1, keepdim=True)
    direction = xyz / d.clip(min=1e-8)
    if name == "exp":
        return direction * torch.expm1(d)
    if name == "square":
        return direction * d.square()
    raise ValueError(f"unknown point activation {name!r}")


def confidence_activation(x: Tensor, mode: tuple) -> Tensor:
    """Raw confidence logits -> confidence. ``('exp', 1, inf)`` gives ``1 + exp(x)`` (always > 1)."""
    name, vmin, vmax = mode
    if name == "exp":
        return vmin + x.exp().clip(max=vmax - vmin)
    if name == "sigmoid":
        return (vmax - vmin) * torch.sigmoid(x) + vmin
    raise ValueError(f"unknown confidence activation {name!r}")


def pose_activation(raw: Tensor, mode: tuple) -> Tensor:
    """Raw pose-MLP output ``(B, 7)`` -> pose encoding ``[t (3), q (4)]``.

    The translation goes through the point activation; the quaternion (real part first) is
    normalised and negated when its real part is negative.
    """
    trans = pointmap_activation(raw[..., :3], mode)
    quat = raw[..., 3:7]
    quat = quat / quat.norm(dim=-1, keepdim=True)
    quat = torch.where(quat[..., :1] < 0, -quat, quat)
    return torch.cat([trans, quat], dim=-1)


def rgb_activation(x: Tensor) -> Tensor:
    """Raw colour logits -> colours in ``(-1, 1)``, the range of the normalised input image."""
    return (torch.sigmoid(x) * (1 - 2e-6) + 1e-6 - 0.5) * 2
