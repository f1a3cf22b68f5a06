"""Geometry helpers: poses (``T_wc``, pose encodings), pinhole cameras, raymaps, focal estimation."""

from .camera import estimate_focal, intrinsics_matrix, pixel_grid, principal_point, pseudo_intrinsics, raymap
from .pose import (
                   invert_transform,
                   matrix_to_pose_encoding,
                   matrix_to_quat_wxyz,
                   pose_encoding_to_matrix,
                   quat_wxyz_to_matrix,
                   transform_points,
)

__all__ = [
    "estimate_focal", "intrinsics_matrix", "pixel_grid", "principal_point", "pseudo_intrinsics", "raymap",
    "invert_transform", "matrix_to_pose_encoding", "matrix_to_quat_wxyz", "pose_encoding_to_matrix",
    "quat_wxyz_to_matrix", "transform_points",
]
