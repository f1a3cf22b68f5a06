"""Output heads of CUT3R."""

from .pts3d_pose import DPTPts3dPose, LinearPts3dPose, build_head

__all__ = ["DPTPts3dPose", "LinearPts3dPose", "build_head"]
