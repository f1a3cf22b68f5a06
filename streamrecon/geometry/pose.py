"""Rigid transforms and the CUT3R pose encoding.

Names carry frames: ``T_wc`` maps camera coordinates to world coordinates (``x_w = R x_c + t``).
Quaternions here are ``(w, x, y, z)`` (real part first) unless a name says ``xyzw``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "quat_wxyz_to_matrix",
    "matrix_to_quat_wxyz",
    "pose_encoding_to_matrix",
    "matrix_to_pose_encoding",
    "transform_points",
    "invert_transform",
]


def quat_wxyz_to_matrix(q: Tensor) -> Tensor:
    """``(*, 4)`` quaternions ``(w, x, y, z)`` (any norm) -> ``(*, 3, 3)`` rotation matrices.

    Hamilton convention with ``two_s = 2 / |q|^2``, exactly as the reference converts poses.
    """
    w, x, y, z = q.unbind(-1)
    two_s = 2.0 / (q * q).sum(-1)
    m = torch.stack(
        [
            1 - two_s * (y * y + z * z), two_s * (x * y - z * w), two_s * (x * z + y * w),
            two_s * (x * y + z * w), 1 - two_s * (x * x + z * z), two_s * (y * z - x * w),
            two_s * (x * z - y * w), two_s * (y * z + x * w), 1 - two_s * (x * x + y * y),
        ],
        dim=-1,
    )
    return m.reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat_wxyz(R: Tensor) -> Tensor:
    """``(*, 3, 3)`` rotation matrices -> ``(*, 4)`` unit quaternions ``(w, x, y, z)`` with ``w >= 0``.

    Uses the numerically stable branch per matrix (largest of ``w, x, y, z``).
    """
    m = R.reshape(-1, 3, 3)
    m00, m11, m22 = m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]
    trace = m00 + m11 + m22
    cands = torch.stack(
        [
            torch.stack([1 + trace, m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1]], -1),
            torch.stack([m[:, 2, 1] - m[:, 1, 2], 1 + m00 - m11 - m22, m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0]], -1),
            torch.stack([m[:, 0, 2] - m[:, 2, 0], m[:, 0, 1] + m[:, 1, 0], 1 - m00 + m11 - m22, m[:, 1, 2] + m[:, 2, 1]], -1),
            torch.stack([m[:, 1, 0] - m[:, 0, 1], m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1], 1 - m00 - m11 + m22], -1),
        ],
        dim=1,
    )  # (n, 4 candidates, 4)
    best = torch.stack([1 + trace, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1).argmax(-1)
    q = cands[torch.arange(m.shape[0], device=R.device), best]
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, :1] < 0, -q, q)
    return q.reshape(R.shape[:-2] + (4,))


def pose_encoding_to_matrix(pose: Tensor) -> Tensor:
    """``(*, 7)`` ``[tx, ty, tz, qw, qx, qy, qz]`` -> ``(*, 4, 4)`` camera-to-world ``T_wc``."""
    T = torch.zeros(pose.shape[:-1] + (4, 4), dtype=pose.dtype, device=pose.device)
    T[..., :3, :3] = quat_wxyz_to_matrix(pose[..., 3:7])
    T[..., :3, 3] = pose[..., :3]
    T[..., 3, 3] = 1
    return T


def matrix_to_pose_encoding(T_wc: Tensor) -> Tensor:
    """``(*, 4, 4)`` camera-to-world -> ``(*, 7)`` pose encoding (inverse of the above)."""
    return torch.cat([T_wc[..., :3, 3], matrix_to_quat_wxyz(T_wc[..., :3, :3])], dim=-1)


def transform_points(T_ab: Tensor, pts_b: Tensor) -> Tensor:
    """Map points from frame b to frame a.

    Args:
        T_ab: ``(B, 4, 4)``.
        pts_b: ``(B, ..., 3)``.

    Returns:
        ``(B, ..., 3)`` points in frame a: ``R pts + t``.
    """
    shape = pts_b.shape
    flat = pts_b.reshape(shape[0], -1, 3)
    out = flat @ T_ab[:, :3, :3].transpose(-1, -2) + T_ab[:, None, :3, 3]
    return out.reshape(shape)


def invert_transform(T_ab: Tensor) -> Tensor:
    """``(*, 4, 4)`` rigid ``T_ab`` -> ``T_ba``."""
    R, t = T_ab[..., :3, :3], T_ab[..., :3, 3:]
    out = torch.zeros_like(T_ab)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1
    return out
